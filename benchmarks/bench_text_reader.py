"""The fine-tuned text reader's training cost (`python -m modeling_clara.text_reader`), three ways side by side in one
run: full logits on rows in random order, logits only where the loss reads them (what the text reader computes), and
those logits on rows batched by length (`--group_by_length true`).

Each way runs forward + backward over the same number of micro-batches of stage-2 rows (the shipped model's
`stage2_instruct.jsonl`, the passages as text), the ways interleaved batch by batch so machine noise hits them alike.
The figure is CPU seconds of this process per 1,000 real (unpadded) tokens, so batches of different lengths compare;
the padding each order costs is printed beside it. Use one thread: the clock is process CPU time.

    OMP_NUM_THREADS=1 python benchmarks/bench_text_reader.py --data runs/shipped/data/stage2_instruct.jsonl
"""

import argparse
import random
import time

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from modeling_clara.checkpoints import SHIPPED_MODEL
from modeling_clara.loading import load_model
from modeling_clara.text_reader import TextReaderCollator, example_length, load_instruct_rows, new_text_reader


def batch_orders(lengths: list[int], batch_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices in random order, and in the Trainer's length-grouped order (without its longest-first batch, which
    it puts first on purpose to fail early on memory)."""
    shuffled = random.Random(seed).sample(range(len(lengths)), len(lengths))
    grouped = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    return shuffled, grouped[batch_size:]


def measure(reader, collator: TextReaderCollator, rows, ways: dict, batch_size: int, batches: int) -> dict[str, dict]:
    """Per way: CPU seconds per 1,000 real tokens, padded / real tokens, and the positions that reached the LM head."""
    cpu, real, padded, head = ({name: 0 for name in ways} for _ in range(4))
    for b in range(batches):
        for name, (order, answer_logits_only) in ways.items():
            batch = collator([rows[i] for i in order[b * batch_size: (b + 1) * batch_size]])
            if not answer_logits_only:
                batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
            began = time.process_time()
            outputs = reader(**batch)
            outputs.loss.backward()
            cpu[name] += time.process_time() - began
            reader.zero_grad()
            real[name] += int(batch["attention_mask"].sum())
            padded[name] += batch["input_ids"].numel()
            head[name] += outputs.logits.shape[0] * outputs.logits.shape[1]
    return {name: {"cpu_per_1000_tokens": 1000 * cpu[name] / real[name], "padding": padded[name] / real[name],
                   "lm_head_positions": head[name]} for name in ways}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SHIPPED_MODEL, help="a CLaRa folder; default: the shipped model")
    parser.add_argument("--data", required=True, help="stage-2 JSONL: question, docs, answer")
    parser.add_argument("--rows", type=int, default=800, help="rows the orders are drawn from")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    clara = load_model(args.model)
    reader = new_text_reader(clara).train()
    collator = TextReaderCollator(clara.processor, top_k=args.top_k)
    rows = load_instruct_rows(args.data)
    rows = rows.select(range(min(args.rows, len(rows))))
    shuffled, grouped = batch_orders([example_length(collator, row) for row in rows], args.batch_size, args.seed)
    ways = {"full logits, random order": (shuffled, False), "answer logits, random order": (shuffled, True),
            "answer logits, length groups": (grouped, True)}
    results = measure(reader, collator, rows, ways, args.batch_size, args.batches)

    baseline = results["full logits, random order"]["cpu_per_1000_tokens"]
    print(f"{args.batches} micro-batches of {args.batch_size} per way, torch threads {torch.get_num_threads()}")
    print("| way | CPU s per 1,000 real tokens | padded / real tokens | vs full logits |\n|---|---|---|---|")
    for name, result in results.items():
        cost = result["cpu_per_1000_tokens"]
        print(f"| {name} | {cost:.2f} | {result['padding']:.2f} | {cost / baseline:.2f} |")
    return results


if __name__ == "__main__":
    main()
