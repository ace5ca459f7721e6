"""Context length and answer latency: CLaRa at several compression rates vs full-text RAG on the same backbone.

Per question, every method reads the same k candidates (the first k in the file's order) and answers with greedy
decoding of exactly `--max-new-tokens` tokens (`min_new_tokens = max_new_tokens`, so every method does the same
decoding work whatever it would have answered). Measured per question and method:

- context tokens: the prompt length fed to the generator (CLaRa: k * (n_mem + 1) slots; text: the passages, cut
  at doc_max_length tokens as the compressor cuts them);
- prefill: time to the first generated token (`max_new_tokens=1`);
- generate: answering from precompressed documents (CLaRa) or from the text prompt (text RAG);
- compress: CLaRa compressing the k documents, timed separately; "compress+generate" is their sum.

Text RAG runs on the plain backbone (a fresh `AutoModelForCausalLM`, no LoRA layers); CLaRa runs its decoder
adapter (untrained models are fine for timing). The methods run one after the other per question, in an order
rotated every question, so machine noise hits all of them alike; one warm-up question is not counted.

    python benchmarks/bench_efficiency.py --data ../shared/data/hotpotqa_dev.jsonl --n-questions 20 --k 5 \\
        --compr-rates 4 16 32 128 --max-new-tokens 32 --output docs/results/efficiency.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import resolve_backbone_path
from modeling_clara.evaluation import load_eval_data, text_prompt, truncate_passage

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa_dev.jsonl"
TEXT = "text"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure_clara(model: ClaraForRAG, question: str, docs: list[str], max_new_tokens: int) -> dict:
    compress_s, embeds = timed(lambda: model.compress(docs, batch_size=len(docs), show_progress_bar=False))
    prefill_s, _ = timed(lambda: model.answer(question, embeds, k=len(docs), max_new_tokens=1))
    generate_s, _ = timed(
        lambda: model.answer(question, embeds, k=len(docs), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    )
    prompt = model.processor.build_prompt(len(docs), question=question)[0]
    tokens = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return {"context_tokens": tokens, "compress_s": compress_s, "prefill_s": prefill_s, "generate_s": generate_s}


def measure_text(backbone, reference: ClaraForRAG, question: str, docs: list[str], max_new_tokens: int) -> dict:
    tokenizer, limit = reference.tokenizer, reference.config.doc_max_length

    def generate(n):
        prompt = text_prompt(reference, question, [truncate_passage(tokenizer, d, limit) for d in docs])
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        output = backbone.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return inputs["input_ids"].shape[1], output.shape[1] - inputs["input_ids"].shape[1]

    prefill_s, _ = timed(lambda: generate(1))
    generate_s, (tokens, generated) = timed(lambda: generate(max_new_tokens))
    assert generated == max_new_tokens, f"text RAG generated {generated} tokens, not {max_new_tokens}"
    return {"context_tokens": tokens, "compress_s": 0.0, "prefill_s": prefill_s, "generate_s": generate_s}


def summarize(rows: list[dict]) -> dict:
    keys = ("context_tokens", "compress_s", "prefill_s", "generate_s")
    summary = {f"{key}_median": statistics.median(r[key] for r in rows) for key in keys}
    summary.update({f"{key}_mean": statistics.fmean(r[key] for r in rows) for key in keys})
    summary["compress_generate_s_median"] = statistics.median(r["compress_s"] + r["generate_s"] for r in rows)
    return summary


@torch.no_grad()  # scoped, not set_grad_enabled: main() may run in-process (tests)
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-questions", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--compr-rates", type=int, nargs="+", default=[4, 16, 32, 128])
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=None, help="JSON with per-question timings and the summary")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    models = {
        f"clara-{cr}": ClaraForRAG.from_backbone(args.backbone, compr_rate=cr, doc_max_length=args.doc_max_length)
        for cr in args.compr_rates
    }
    reference = next(iter(models.values()))
    backbone = AutoModelForCausalLM.from_pretrained(resolve_backbone_path(args.backbone)).eval()
    backbone.generation_config.pad_token_id = reference.tokenizer.pad_token_id
    methods = [TEXT, *models]
    examples = [ex for ex in load_eval_data(args.data, args.n_questions + 1) if len(ex.docs) >= args.k]

    def run(method, example):
        docs = example.docs[: args.k]
        if method == TEXT:
            return measure_text(backbone, reference, example.question, docs, args.max_new_tokens)
        return measure_clara(models[method], example.question, docs, args.max_new_tokens)

    for method in methods:  # warm-up, not counted
        run(method, examples[0])
    rows = {method: [] for method in methods}
    for i, example in enumerate(examples[1:]):
        for method in methods[i % len(methods) :] + methods[: i % len(methods)]:  # rotated order
            rows[method].append({"id": example.id, **run(method, example)})

    summaries = {method: summarize(r) for method, r in rows.items()}
    text = summaries[TEXT]
    print(f"backbone={args.backbone} data={args.data.name} questions={len(examples) - 1} k={args.k} "
          f"doc_max_length={args.doc_max_length} new tokens={args.max_new_tokens} (forced) "
          f"threads={torch.get_num_threads()}; medians per question")
    print("| method | CR | context tokens | prefill s | generate s | compress s | compress+generate s | "
          "tokens ratio | prefill ratio | generate ratio | compress+generate ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, s in summaries.items():
        cr = "–" if method == TEXT else method.split("-")[1]
        print(
            f"| {'text RAG' if method == TEXT else 'CLaRa'} | {cr} | {s['context_tokens_median']:.0f} | "
            f"{s['prefill_s_median']:.3f} | {s['generate_s_median']:.3f} | {s['compress_s_median']:.3f} | "
            f"{s['compress_generate_s_median']:.3f} | {s['context_tokens_median'] / text['context_tokens_median']:.3f} | "
            f"{s['prefill_s_median'] / text['prefill_s_median']:.2f} | "
            f"{s['generate_s_median'] / text['generate_s_median']:.2f} | "
            f"{s['compress_generate_s_median'] / text['generate_s_median']:.2f} |"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "output"}
        settings["threads"] = torch.get_num_threads()
        args.output.write_text(json.dumps({"settings": settings, "summary": summaries, "per_question": rows}, indent=1))
    return summaries


if __name__ == "__main__":
    main()
