"""Decoding speed at batch 1 against the memory-bandwidth limit: `generate` on the LoRA-wrapped backbone vs the
fast decoding loop (`modeling_clara.decoding_clara`), side by side in one run: both through
`ClaraForRAG.generate_from_memory`, with `model.fast_decoding` off and on.

The limit: a decoding step reads every weight of the generator once (the layers' linears and norms and the output
head; the embedding lookup reads one row), so it cannot take less than those bytes over the copy bandwidth of this
machine (a large tensor copied, bytes read + bytes written per second, with the same thread count).

Each path answers the same question from the same compressed documents, forced to generate exactly `--new-tokens`
tokens (`min_new_tokens`); ms per token = (time for N tokens - time for 1 token) / (N - 1), which leaves the prefill
out. Peak RSS (VmHWM) of one `answer` call on the freshly loaded model is measured in a subprocess per path. The
paths and the bandwidth copy alternate within every repeat, so load on a shared machine hits them alike;
the medians are reported. With one thread the clock is the process's CPU time (time the process ran, not time it
waited for a core on a loaded machine); with more, wall time. The greedy answers of both paths are compared.

    OMP_NUM_THREADS=1 python benchmarks/bench_decoding.py --threads 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_clara import ClaraForRAG
from modeling_clara.configuration_clara import DECODER_ADAPTER
from modeling_clara.decoding_clara import ClaraFastDecoder, ClaraFastGenerator

SHIPPED_CORPUS = Path(__file__).resolve().parents[1] / "modeling_clara" / "shipped" / "corpus.jsonl"
QUESTION = "Where is the National Palace Museum?"


# Load the model, answer one question from two bundled passages, print the process's peak RSS in bytes.
PEAK_RSS_OF_ANSWER = """
import json, sys, torch
torch.set_num_threads(1)
from modeling_clara import ClaraForRAG
model = ClaraForRAG.from_pretrained(sys.argv[1]).eval()
model.fast_decoding = sys.argv[2] == "fast"
passages = [json.loads(line)["text"] for line in open(sys.argv[3]).read().splitlines()[:2]]
model.answer(sys.argv[4], model.compress(passages))
print(int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024)
"""


def peak_rss_of_answer(model: str, path: str) -> int:
    command = [sys.executable, "-c", PEAK_RSS_OF_ANSWER, model, path, str(SHIPPED_CORPUS), QUESTION]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def copy_seconds(source: torch.Tensor, target: torch.Tensor, clock) -> float:
    start = clock()
    target.copy_(source)
    return clock() - start


def step_bytes(decoder: ClaraFastDecoder) -> int:
    """Bytes of weights one decoding step reads."""
    tensors = [decoder.final_norm, decoder.lm_head]
    for layer in decoder.layers:
        tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up, layer.down]
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=2, help="documents in the prompt (the first k of the shipped corpus)")
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the tensor copied to measure bandwidth")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    clock = time.process_time if args.threads == 1 else time.perf_counter
    model = ClaraForRAG.from_pretrained(args.model).eval()
    documents = [json.loads(line)["text"] for line in SHIPPED_CORPUS.read_text().splitlines()[: args.k]]
    memory = [model.compress(documents)]

    def run(path: str, n: int) -> list[str]:
        model.fast_decoding = path == "fast"
        with torch.no_grad():
            return model.generate_from_memory([QUESTION], memory, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    paths = ("generate", "fast")
    answers = {path: run(path, args.new_tokens) for path in paths}  # also the warm-up (and the merge of the weights)
    weight_bytes = step_bytes(ClaraFastGenerator().decoder_for(model.decoder, DECODER_ADAPTER))
    source = torch.randn(args.copy_mib * 2**18)
    target = torch.empty_like(source)
    bandwidths, prefill, per_token = [], {p: [] for p in paths}, {p: [] for p in paths}
    for _ in range(args.repeats):
        bandwidths.append(2 * source.numel() * source.element_size() / copy_seconds(source, target, clock))
        for path in paths:
            start = clock()
            run(path, 1)
            one = clock() - start
            start = clock()
            run(path, args.new_tokens)
            many = clock() - start
            prefill[path].append(one)
            per_token[path].append((many - one) / (args.new_tokens - 1))
    bandwidth = statistics.median(bandwidths)
    limit_ms = 1e3 * weight_bytes / bandwidth
    results = {
        "threads": args.threads, "clock": "cpu" if args.threads == 1 else "wall", "copy_gb_s": bandwidth / 1e9,
        "step_weight_mb": weight_bytes / 1e6, "limit_ms": limit_ms, "new_tokens": args.new_tokens, "k": args.k,
        "same_answer": answers["fast"] == answers["generate"], "paths": {},
    }
    for path in paths:
        ms = 1e3 * statistics.median(per_token[path])
        peak = peak_rss_of_answer(args.model, path)
        results["paths"][path] = {
            "prefill_ms": 1e3 * statistics.median(prefill[path]), "ms_per_token": ms,
            "fraction_of_limit": limit_ms / ms, "answer_peak_rss_mb": peak / 1e6,
        }
    results["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"{os.cpu_count()} cores, load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"threads {args.threads} ({results['clock']} time), "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), "
          f"weights read per step {weight_bytes / 1e6:.0f} MB -> limit {limit_ms:.1f} ms per step")
    print(f"{'path':<10} {'prefill ms':>10} {'ms/token':>9} {'fraction of limit':>18} {'answer peak RSS MB':>19}")
    for path, row in results["paths"].items():
        print(f"{path:<10} {row['prefill_ms']:>10.1f} {row['ms_per_token']:>9.1f} {row['fraction_of_limit']:>18.2f} "
              f"{row['answer_peak_rss_mb']:>19.0f}")
    print(f"same greedy answer ({args.new_tokens} tokens forced): {results['same_answer']}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
