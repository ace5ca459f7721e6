"""The most a server can gain from batching on this machine: one `answer_batch` of B requests against one of 1.

`clara serve` runs every batch through `ClaraServingEngine.answer_batch` (question encoding, index search, one
generate call). A server that always had B requests waiting could at best answer B requests in the time of one such
batch, so `B * t(1) / t(B)` bounds the throughput ratio of `bench_serve.py` (concurrent clients against sequential
requests) before any HTTP, queueing or tokenizer cost. This script measures it in-process, with the parts of a
batch timed apart (question encoding; retrieval and generation), so it says which part does not shrink per request.
Both decoding paths are measured side by side in one run: the fast loop (`model.fast_decoding`, what the server runs
on CPU) and `generate` on the LoRA-wrapped backbone.

    python benchmarks/bench_batching_ceiling.py                        # shipped model, bundled corpus, B = 16
    taskset -c 1 python benchmarks/bench_batching_ceiling.py --threads 1  # as a server pinned to one core
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.serving.engine import AnswerRequest, ClaraServingEngine

QUESTIONS = [f"{template} {topic}?" for template in ("What is known about", "Where is", "Who is associated with", "When was")
             for topic in ("the live album 'In Concert'", "the Oketo Forest Railway", "the river in this passage",
                           "the first person named", "the year it happened", "the country it is in",
                           "the band's members", "the railway's length")]


def clock() -> float:
    """The process's CPU time with one torch thread (waiting for a core on a shared machine does not count), else
    wall time."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        started = clock()
        function()
        seconds.append(clock() - started)
    return statistics.median(seconds)


def measure(engine: ClaraServingEngine, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    requests = [AnswerRequest(QUESTIONS[i % len(QUESTIONS)], None, engine.model.config.generation_top_k, max_new_tokens)
                for i in range(batch_size)]
    questions = [r.question for r in requests]
    with torch.no_grad():
        total = timed(lambda: engine.answer_batch(requests), repeats)
        encode = timed(lambda: engine.model.encode_queries(questions), repeats)
    return {"batch": batch_size, "total": total, "encode": encode, "rest": total - encode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--corpus", default=SHIPPED_CORPUS_FILE)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="as bench_serve.py")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.batch_size < 2 or args.repeats < 1:
        raise SystemExit("--batch-size must be >= 2 and --repeats >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = ClaraForRAG.from_pretrained(args.model)
    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="clara-ceiling-") as scratch:
        index = ClaraIndex.build(model, args.corpus, output_dir=str(Path(scratch) / "index"))
        engine = ClaraServingEngine(model, index)
        for path, fast in (("fast loop", True), ("generate", False)):
            model.fast_decoding = fast
            measure(engine, 2, args.max_new_tokens, 1)  # warm-up: first calls allocate (and merge the weights)
            rows[path] = (measure(engine, 1, args.max_new_tokens, args.repeats),
                          measure(engine, args.batch_size, args.max_new_tokens, args.repeats))
    load_after = os.getloadavg()
    print(f"model {args.model}, max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, {'CPU' if torch.get_num_threads() == 1 else 'wall'} time; {os.cpu_count()} cores, load average (1 min) {load_before[0]:.1f} "
          f"before, {load_after[0]:.1f} after")
    print("| decoding | batch | answer_batch (s) | question encoding (s) | retrieval + generation (s) | s per request |")
    print("|---|---|---|---|---|---|")
    for path, pair in rows.items():
        for row in pair:
            print(f"| {path} | {row['batch']} | {row['total']:.3f} | {row['encode']:.3f} | {row['rest']:.3f} | "
                  f"{row['total'] / row['batch']:.3f} |")
    for path, (one, many) in rows.items():
        ceiling = args.batch_size * one["total"] / many["total"]
        print(f"{path}: ceiling of batching {args.batch_size} requests {ceiling:.2f}x the throughput of one at a time "
              f"(per request, encoding {many['encode'] / args.batch_size / one['encode']:.2f} and the rest "
              f"{many['rest'] / args.batch_size / one['rest']:.2f} of their one-request cost)")
    fast_one, fast_many = rows["fast loop"]
    slow_one, slow_many = rows["generate"]
    print(f"fast loop against generate: one request {slow_one['total'] / fast_one['total']:.2f}x, a batch of "
          f"{args.batch_size} {slow_many['total'] / fast_many['total']:.2f}x as fast")


if __name__ == "__main__":
    main()
