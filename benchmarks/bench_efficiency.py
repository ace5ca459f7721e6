"""CLaRa vs text RAG on the same backbone and the same generation path: speed as users get it, and context length.

`--users` (the table the docs lead with): the shipped CLaRa (or `--model`) against text RAG on its bare backbone,
both decoding through the fast loop of `modeling_clara.decoding_clara` (CLaRa's decoder adapter merged, the bare
backbone as it is), greedy, natural answers (stopping at the end of turn, at most `--max-new-tokens`), at each k:

- answer tokens: the mean length of the answers (their text tokenized again);
- first token: time to the first token (prefill; CLaRa from documents compressed beforehand, i.e. an index);
- answer (index): the whole answer from precompressed documents; answer (on the fly): compressing the k
  documents and then answering; text RAG reads the passages (cut at doc_max_length tokens, as the compressor cuts);
- throughput: questions answered per second in batches of 1, 8, 32 and the largest batch whose key/value cache
  fits `--kv-budget-mib` (prompts plus `--max-new-tokens`, the fast loop's cache), CLaRa from an index.

One thread; the clock is the process's CPU time (the machine is shared), so the numbers are time spent computing.

    OMP_NUM_THREADS=1 python benchmarks/bench_efficiency.py --users --n-questions 32 --k 5 --kv-budget-mib 256

Without `--users`, the forced-length table: CLaRa at several compression rates (untrained, fine for timing) vs
text RAG. Per question, every method reads the same k candidates (the first k in the file's order) and answers with
greedy decoding of exactly `--max-new-tokens` tokens (`min_new_tokens = max_new_tokens`, so every method does the
same decoding work whatever it would have answered). Measured per question and method:

- context tokens: the prompt length fed to the generator (CLaRa: k * (n_mem + 1) slots; text: the passages, cut
  at doc_max_length tokens as the compressor cuts them);
- prefill: time to the first generated token (`max_new_tokens=1`);
- generate: answering from precompressed documents (CLaRa) or from the text prompt (text RAG);
- compress: CLaRa compressing the k documents, timed separately; "compress+generate" is their sum.

Text RAG runs on the plain backbone (a fresh `AutoModelForCausalLM`, no LoRA layers); CLaRa runs its decoder
adapter (untrained models are fine for timing); both decode through the same fast loop. The methods run one after the other per question, in an order
rotated every question, so machine noise hits all of them alike; one warm-up question is not counted.

    OMP_NUM_THREADS=1 python benchmarks/bench_efficiency.py --data ../shared/data/hotpotqa_dev.jsonl --n-questions 5 \\
        --k 5 --compr-rates 4 16 32 128 --max-new-tokens 32
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import resolve_backbone_path
from modeling_clara.decoding_clara import ClaraFastGenerator
from modeling_clara.evaluation import load_eval_data, text_prompt, truncate_passage

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa_dev.jsonl"
TEXT = "text"
TEXT_DECODING = ClaraFastGenerator()  # the bare backbone's weights for the fast loop, built once


def timed(fn) -> tuple[float, object]:
    """Seconds `fn()` took (the process's CPU time with one torch thread, so waiting for a core on a shared machine
    does not count; wall time with more) and its result."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    result = fn()
    return clock() - start, result


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
        # Through the fast decoding loop, as CLaRa's answers decode, so the two differ only in their prompts.
        prompt = text_prompt(reference, question, [truncate_passage(tokenizer, d, limit) for d in docs])
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        embeds = backbone.get_input_embeddings()(inputs["input_ids"])
        output = TEXT_DECODING.generate(backbone, None, embeds, inputs["attention_mask"], max_new_tokens=n,
                                        min_new_tokens=n)
        return inputs["input_ids"].shape[1], output.shape[1]

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


class TextRag:
    """Text RAG on the bare backbone through the same fast decoding loop as CLaRa's answers."""

    def __init__(self, reference: ClaraForRAG):
        path = resolve_backbone_path(reference.config.decoder_model_name)
        self.backbone = AutoModelForCausalLM.from_pretrained(path).to(reference.dtype).eval()
        self.reference, self.fast = reference, ClaraFastGenerator()

    def prompts(self, questions: list[str], documents: list[list[str]]) -> list[str]:
        tokenizer, limit = self.reference.tokenizer, self.reference.config.doc_max_length
        return [text_prompt(self.reference, q, [truncate_passage(tokenizer, d, limit) for d in docs])
                for q, docs in zip(questions, documents)]

    def answer(self, questions: list[str], documents: list[list[str]], max_new_tokens: int) -> list[str]:
        tokenizer = self.reference.tokenizer
        inputs = tokenizer(self.prompts(questions, documents), add_special_tokens=False, padding=True,
                           return_tensors="pt")
        embeds = self.backbone.get_input_embeddings()(inputs["input_ids"])
        tokens = self.fast.generate(self.backbone, None, embeds, inputs["attention_mask"],
                                    max_new_tokens=max_new_tokens)
        if tokens is None:
            raise RuntimeError("the fast decoding loop does not run this backbone; text RAG would not be comparable")
        return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def clara_answer(model: ClaraForRAG, questions, memories, max_new_tokens: int) -> list[str]:
    return model.generate_from_memory(questions, memories, max_new_tokens=max_new_tokens)


def kv_bytes_per_token(model: ClaraForRAG) -> int:
    config = model.decoder.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize


def users_view(args) -> dict:
    """The `--users` measurements (see the module docstring)."""
    clock = time.process_time
    load_at_start = os.getloadavg()[0]
    model = ClaraForRAG.from_pretrained(args.model).eval()
    text = TextRag(model)
    examples = [ex for ex in load_eval_data(args.data, 4 * args.n_questions) if len(ex.docs) >= max(args.k)]
    examples = examples[: args.n_questions + 1]
    questions = [ex.question for ex in examples]

    def timed_clock(fn):
        start = clock()
        result = fn()
        return clock() - start, result

    max_new_tokens = args.max_new_tokens or model.config.max_new_tokens

    def answer_length(answer: str) -> int:
        return len(model.tokenizer(answer, add_special_tokens=False)["input_ids"])

    results = {}
    for k in args.k:
        documents = [ex.docs[:k] for ex in examples]
        memories = [model.compress(docs, batch_size=k, show_progress_bar=False) for docs in documents]
        prompt_tokens = {
            "clara": [len(model.processor.prompt_ids([model.processor.build_prompt(k, question=q)[0]])[0])
                      for q in questions],
            "text": [len(model.tokenizer(p, add_special_tokens=False)["input_ids"])
                     for p in text.prompts(questions, documents)],
        }
        clara_answer(model, questions[:1], memories[:1], 2)  # warm-up (and the merge of the weights), not counted
        text.answer(questions[:1], documents[:1], 2)
        rows = {"clara": [], "text": []}
        for i in range(1, min(len(examples), args.latency_questions + 1)):
            q, docs, memory = [questions[i]], [documents[i]], [memories[i]]
            compress_s, _ = timed_clock(lambda: model.compress(docs[0], batch_size=k, show_progress_bar=False))
            first_s, _ = timed_clock(lambda: clara_answer(model, q, memory, 1))
            answer_s, answer = timed_clock(lambda: clara_answer(model, q, memory, max_new_tokens))
            rows["clara"].append({"first_s": first_s, "answer_s": answer_s, "fly_s": compress_s + answer_s,
                                  "answer_tokens": answer_length(answer[0])})
            first_s, _ = timed_clock(lambda: text.answer(q, docs, 1))
            answer_s, answer = timed_clock(lambda: text.answer(q, docs, max_new_tokens))
            rows["text"].append({"first_s": first_s, "answer_s": answer_s, "fly_s": answer_s,
                                 "answer_tokens": answer_length(answer[0])})
        per_token = kv_bytes_per_token(model)
        summary = {}
        for method, method_rows in rows.items():
            longest = max(prompt_tokens[method]) + max_new_tokens
            largest = max(1, min(len(examples), args.kv_budget_mib * 2**20 // (per_token * longest)))
            throughput = {}
            for batch in sorted({1, 8, 32, largest}):
                if batch > len(examples):
                    continue
                n = min(max(batch, 8), len(examples))  # batch 1: eight questions one after the other
                start = clock()
                for first in range(0, n, batch):
                    chunk = slice(first, min(first + batch, n))
                    if method == "clara":
                        clara_answer(model, questions[chunk], memories[chunk], max_new_tokens)
                    else:
                        text.answer(questions[chunk], documents[chunk], max_new_tokens)
                throughput[batch] = n / (clock() - start)
            summary[method] = {
                "prompt_tokens_mean": statistics.fmean(prompt_tokens[method]), "largest_batch": largest,
                **{f"{key}_mean": statistics.fmean(r[key] for r in method_rows) for key in method_rows[0]},
                "questions_per_s": throughput,
            }
        results[k] = summary
    print(f"model={args.model} data={args.data.name} questions={len(examples) - 1} (latency: the first "
          f"{args.latency_questions}) natural answers (at most "
          f"{max_new_tokens} tokens), one thread, CPU time; KV budget {args.kv_budget_mib} MiB; means; "
          f"{os.cpu_count()} cores, load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("| k | method | prompt tokens | answer tokens | first token s | answer (index) s | answer (on the fly) s | "
          "q/s batch 1 | q/s batch 8 | q/s batch 32 | largest batch | q/s largest |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, summary in results.items():
        for method, s in summary.items():
            qps = s["questions_per_s"]
            cells = [f"{qps[b]:.2f}" if b in qps else "–" for b in (1, 8, 32)]
            print(f"| {k} | {'CLaRa' if method == 'clara' else 'text RAG'} | {s['prompt_tokens_mean']:.0f} | "
                  f"{s['answer_tokens_mean']:.1f} | {s['first_s_mean']:.3f} | {s['answer_s_mean']:.3f} | "
                  f"{s['fly_s_mean']:.3f} | {' | '.join(cells)} | {s['largest_batch']} | "
                  f"{qps[s['largest_batch']]:.2f} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                          indent=1))
    return results


@torch.no_grad()  # scoped, not set_grad_enabled: main() may run in-process (tests)
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", action="store_true", help="the users' view (natural answers, throughput)")
    parser.add_argument("--model", default="shipped", help="--users: the CLaRa model")
    parser.add_argument("--latency-questions", type=int, default=8,
                        help="--users: questions timed one by one (the throughput batches draw from --n-questions)")
    parser.add_argument("--kv-budget-mib", type=int, default=512, help="--users: KV-cache budget for the largest batch")
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-questions", type=int, default=20)
    parser.add_argument("--k", type=int, nargs="+", default=[5], help="documents per question (--users: several)")
    parser.add_argument("--compr-rates", type=int, nargs="+", default=[4, 16, 32, 128])
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="forced length (default 32); --users: the most an answer may take (default the model's)")
    parser.add_argument("--output", type=Path, default=None, help="JSON with per-question timings and the summary")
    args = parser.parse_args(argv)
    if args.users:
        torch.set_num_threads(1)
        return users_view(args)
    args.k, args.max_new_tokens = args.k[0], args.max_new_tokens or 32
    load_at_start = os.getloadavg()[0]

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
          f"threads={torch.get_num_threads()} ({'CPU' if torch.get_num_threads() == 1 else 'wall'} time); medians per "
          f"question; {os.cpu_count()} cores, load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} "
          f"at the end")
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
