"""The top-k rung: does the answer loss alone, through CLaRa's straight-through top-k, teach a query reasoner to rank?

Start from the shipped CLaRa (its compressor and generator read memory), reset its query reasoner to an untrained one
(a copy of the encoder adapter, as stage 3 builds it, or a fresh LoRA), freeze everything else, and train the query
reasoner on questions that each come with their gold passage and 3 BM25 distractors, the generator reading the top 1:

- `answer`: the answer's cross-entropy through the straight-through top-k alone (`retrieval_weight 0`; `pos_index`
  only measures),
- `infonce`: the supervised InfoNCE over `pos_index` alone (the generator does not run),
- `both`: the two summed (`retrieval_weight 1`).

Reported on held-out questions (passages no stage of the shipped model trained on): Recall@1 among the 4 candidates
(chance 0.25) before and after, and answer F1 reading the learned top-1. Results: research/topk/README.md.

Cost on one CPU core is the generator's backward pass, so the rung computes what the frozen generator contributes
once, before training: for every training question and each of its candidates, the answer's cross-entropy reading
that candidate's memory and its gradient with respect to that memory (`AnswerTable`). With the generator and the
memory frozen, the straight-through top-k's backward (`differentiable_topk`: d loss / d weight_n = <gradient at the
selected memory, memory_n>) needs nothing else, so every arm, temperature and seed then costs the query reasoner's
passes only (`straight_through_answer_loss`; research/topk/test_rung.py checks its gradient against the model's own
forward through the top-k). Likewise every held-out question is answered once from each candidate, so F1 through any
ranking is a look-up. The generator runs in eval mode (no LoRA dropout), as at inference.

    python examples/shipped_model/prepare_data.py --out-dir runs/topk/data --instruct-docs 2 --e2e-candidates 4 \\
        --reconstruction
    python research/topk/rung.py --data runs/topk/data --arm answer --temperature 0.02 --seed 0 \\
        --output runs/topk/answer-t0.02-s0.json
"""

import argparse
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rank_bm25 import BM25Okapi
from transformers.utils import logging

from modeling_clara import ClaraForRAG, differentiable_topk
from modeling_clara.configuration_clara import ENCODER_ADAPTER, QUERY_REASONER_ADAPTER
from modeling_clara.data import make_collator
from modeling_clara.metrics.clara_qa.clara_qa import score_example
from modeling_clara.modeling_clara import per_example_cross_entropy
from modeling_clara.training import ClaraTrainingArguments, prepare_model_for_stage

logger = logging.get_logger("clara.research.topk")

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "modeling_clara" / "shipped" / "clara-smollm2-135m"
ARMS = ("answer", "infonce", "both")
QUERY_REASONER_INITS = ("encoder", "fresh")
N_CANDIDATES = 4


# --------------------------------------------------------------------------------------------------------------
# Data: questions with their gold passage and BM25 distractors


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def candidate_rows(records: list[dict], questions_per_doc: int | None, seed: int) -> list[dict]:
    """One row per question of each SCP record (at most `questions_per_doc`, drawn at random): the record's passage
    and the `N_CANDIDATES - 1` passages of the other records BM25 ranks highest for the question, in random order,
    `pos_index` marking the gold one (the construction of examples/shipped_model/prepare_data.py, within `records`)."""
    documents = [record["docs"][0] for record in records]
    bm25 = BM25Okapi([_words(doc) for doc in documents])
    rng = random.Random(seed)
    rows = []
    for gold, record in enumerate(records):
        pairs = list(zip(record["question"], record["answers"]))
        if questions_per_doc is not None:
            pairs = rng.sample(pairs, min(questions_per_doc, len(pairs)))
        for question, answer in pairs:
            scores = bm25.get_scores(_words(question))
            ranked = sorted((i for i in range(len(documents)) if i != gold), key=lambda i: -scores[i])
            picked = [gold] + ranked[: N_CANDIDATES - 1]
            rng.shuffle(picked)
            rows.append({
                "question": question, "docs": [documents[i] for i in picked], "answer": answer,
                "pos_index": [picked.index(gold)],
            })
    return rows


def training_records(data_dir: Path, n_docs: int) -> list[dict]:
    """The first `n_docs` QA records of the shipped model's stage-1 training file (training passages only)."""
    records = [r for r in read_jsonl(data_dir / "stage1_pretrain.jsonl") if r.get("data_type", "qa") == "qa"]
    return records[:n_docs]


# --------------------------------------------------------------------------------------------------------------
# Model and frozen parts


def load_rung_model(model_path: str | os.PathLike, init: str) -> ClaraForRAG:
    """The model with its query reasoner reset: a copy of the encoder adapter (`"encoder"`, stage 3's chaining) or a
    fresh LoRA whose B is zero (`"fresh"`: queries start as the bare backbone's states)."""
    if init not in QUERY_REASONER_INITS:
        raise ValueError(f"init={init!r} is not one of {QUERY_REASONER_INITS}")
    model = ClaraForRAG.from_pretrained(model_path)
    # The library adds a query reasoner only to a model without one (training.add_query_reasoner); the shipped model
    # has a trained one, so its weights are overwritten in place.
    state = model.adapter_state_dict(ENCODER_ADAPTER)
    if init == "fresh":
        state = {key: torch.zeros_like(value) if "lora_B" in key else value for key, value in state.items()}
    model.load_adapter_state_dict(QUERY_REASONER_ADAPTER, state)
    return model


def candidate_memory(model: ClaraForRAG, texts: list[str], cache_path: Path | None) -> dict[str, torch.Tensor]:
    """Every distinct text's memory `{text: (n_mem, hidden)}` from the frozen compressor, computed once and kept in
    `cache_path`."""
    memory = torch.load(cache_path) if cache_path is not None and cache_path.is_file() else {}
    missing = sorted((text for text in dict.fromkeys(texts) if text not in memory), key=len)
    if missing:
        # The encoder layout's left padding is not run: the SCP passages fill about half of it.
        memory.update(zip(missing, model.compress(missing, skip_padding=True)))
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(memory, cache_path)
    return memory


def autocast(model: ClaraForRAG, bf16: bool):
    """bf16 autocast on the model's device when asked (about 1.8x faster on an AVX512-BF16 CPU core)."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)


def _stack(memory: dict[str, torch.Tensor], docs: list[str]) -> torch.Tensor:
    return torch.stack([memory[doc] for doc in docs])  # (n_docs, n_mem, hidden)


def prepare_query_reasoner_training(model: ClaraForRAG, temperature: float, output_dir: str) -> None:
    """The library's e2e set-up with only the query reasoner trainable and the top-k / InfoNCE temperature set."""
    args = ClaraTrainingArguments(
        output_dir=output_dir, stage="e2e", retrieval_weight=1.0, freeze_generator=True,
        topk_temperature=temperature, generation_top_k=1, report_to="none",
    )
    prepare_model_for_stage(model, args)


def single_candidate_rows(rows: list[dict]) -> list[dict]:
    """Each candidate of each row as a row of its own (one candidate: the top-1 is that candidate), in row order."""
    return [
        {"question": row["question"], "docs": [doc], "answer": row["answer"], "pos_index": []}
        for row in rows for doc in row["docs"]
    ]


@dataclass
class AnswerTable:
    """What the frozen generator contributes, per training question and candidate.

    Attributes:
        cross_entropy (`(n_rows, n_candidates)`): the answer's mean token cross-entropy reading that candidate alone.
        gradient (`(n_rows, n_candidates, n_mem, hidden)`): its gradient with respect to that candidate's memory.
    """

    cross_entropy: torch.Tensor
    gradient: torch.Tensor


def answer_table(
    model: ClaraForRAG, rows: list[dict], memory: dict[str, torch.Tensor], batch_size: int = 8, bf16: bool = False
) -> AnswerTable:
    """Read each candidate of each row alone through the model's end-to-end forward (one candidate, so the top-1 is
    that candidate) and keep the answer's cross-entropy and its gradient with respect to the memory read."""
    model.eval()
    model.set_trainable_adapters([])  # only the memory's gradient is wanted
    collator = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory)
    single = single_candidate_rows(rows)
    cross_entropy, gradient = [], []
    for start in logging.tqdm(range(0, len(single), batch_size), desc="Answer table"):
        batch = collator(single[start : start + batch_size])
        batch.pop("positive_mask")
        embeds = batch["candidate_embeds"].requires_grad_(True)
        with autocast(model, bf16):
            outputs = model(**batch)
        losses = per_example_cross_entropy(outputs.logits, batch["labels"])
        (grad,) = torch.autograd.grad(losses.sum(), embeds)
        cross_entropy.append(losses.detach())
        gradient.append(grad[:, 0])
    shape = (len(rows), N_CANDIDATES)
    return AnswerTable(torch.cat(cross_entropy).view(shape), torch.cat(gradient).view(*shape, *gradient[0].shape[1:]))


@torch.no_grad()
def f1_table(model: ClaraForRAG, rows: list[dict], memory: dict[str, torch.Tensor], batch_size: int = 16,
             max_new_tokens: int = 32) -> torch.Tensor:
    """`(n_rows, n_candidates)`: token F1 (max over accepted answers) of the greedy answer reading that candidate
    alone."""
    model.eval()
    pairs = [(row, doc) for row in rows for doc in row["docs"]]
    scores = []
    for start in logging.tqdm(range(0, len(pairs), batch_size), desc="F1 table"):
        batch = pairs[start : start + batch_size]
        answers = model.answer(
            [row["question"] for row, _ in batch], [_stack(memory, [doc]) for _, doc in batch], k=1,
            max_new_tokens=max_new_tokens,
        )
        scores += [score_example(answer, [row["answer"]])["f1"] for answer, (row, _) in zip(answers, batch)]
    return torch.tensor(scores).view(len(rows), N_CANDIDATES)


# --------------------------------------------------------------------------------------------------------------
# Training the query reasoner


def straight_through_answer_loss(
    scores: torch.Tensor, temperature: float, candidate_embeds: torch.Tensor, table_rows: AnswerTable
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answer loss of the generator reading the top-1 candidate, with the straight-through top-k's gradient.

    The model's forward selects `einsum(weights, memory)` with `weights = hard + soft - soft.detach()`, so d loss /
    d weight_n = <gradient at the selected memory, memory_n>. With the generator frozen that gradient is the table's,
    so `sum_n weight_n * <g_selected, memory_n>` (its value is not the loss; its gradient is the model's) carries it.

    Returns:
        `(surrogate, cross_entropy, top)`: the term to back-propagate, the answer cross-entropy of the selected
        candidates `(batch,)`, and their indices `(batch,)`.
    """
    weights, top = differentiable_topk(scores, 1, temperature)
    top = top[:, 0]
    rows = torch.arange(len(top))
    selected_gradient = table_rows.gradient[rows, top]  # (batch, n_mem, hidden)
    coefficients = torch.einsum("bmh,bnmh->bn", selected_gradient.float(), candidate_embeds.float())
    surrogate = (weights[:, 0].float() * coefficients).sum(dim=1)
    return surrogate, table_rows.cross_entropy[rows, top], top


def shuffled_batches(n_rows: int, batch_size: int, seed: int):
    """Row indices batch after batch, epoch after epoch, each epoch a seeded permutation (a batch may span two)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(n_rows, generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        yield picked


def train_query_reasoner(
    model: ClaraForRAG, rows: list[dict], table: AnswerTable | None, memory: dict[str, torch.Tensor], arm: str,
    temperature: float, steps: int, batch_size: int, learning_rate: float, seed: int, bf16: bool = False,
) -> list[dict]:
    """AdamW (Apple's betas, no weight decay, constant rate) on the query reasoner alone; returns a per-step log."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is not one of {ARMS}")
    if arm != "infonce" and table is None:
        raise ValueError(f"arm {arm!r} needs the answer table")
    with tempfile.TemporaryDirectory() as output_dir:
        prepare_query_reasoner_training(model, temperature, output_dir)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    collator = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory, retrieval_only=True)
    log = []
    model.train()  # LoRA dropout in the query reasoner, as in the library's training
    batches = shuffled_batches(len(rows), batch_size, seed)
    for step in logging.tqdm(range(steps), desc=f"{arm} t={temperature}"):
        picked = next(batches)
        batch = collator([rows[i] for i in picked])
        with autocast(model, bf16):
            outputs = model(**batch)
        positives = batch["positive_mask"]
        entry = {"step": step + 1, "infonce": outputs.retrieval_loss.item()}
        loss = outputs.retrieval_loss if arm != "answer" else 0.0
        if arm != "infonce":
            table_rows = AnswerTable(table.cross_entropy[picked], table.gradient[picked])
            surrogate, cross_entropy, top = straight_through_answer_loss(
                outputs.retrieval_scores, temperature, batch["candidate_embeds"], table_rows
            )
            loss = loss + surrogate.mean()
            entry["answer_ce"] = cross_entropy.mean().item()
        else:
            top = outputs.retrieval_scores.argmax(dim=1)
        entry["batch_recall_at_1"] = positives[torch.arange(len(top)), top].float().mean().item()
        optimizer.zero_grad()
        loss.backward()
        entry["grad_norm"] = torch.nn.utils.clip_grad_norm_(parameters, 1.0).item()
        optimizer.step()
        log.append(entry)
    model.eval()
    return log


# --------------------------------------------------------------------------------------------------------------
# Measuring


@torch.no_grad()
def rankings(
    model: ClaraForRAG, rows: list[dict], memory: dict[str, torch.Tensor], batch_size: int = 32
) -> torch.Tensor:
    """`(n_rows,)` the candidate each row's query reasoner ranks first."""
    model.eval()
    top = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        _, indices = model.retrieve([r["question"] for r in batch], [_stack(memory, r["docs"]) for r in batch], k=1)
        top += [int(i[0]) for i in indices]
    return torch.tensor(top)


def recall_at_1(top: torch.Tensor, rows: list[dict]) -> float:
    return sum(int(t) in row["pos_index"] for t, row in zip(top, rows)) / len(rows)


def gold_indices(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([row["pos_index"][0] for row in rows])


def table_summary(table: AnswerTable, rows: list[dict]) -> dict:
    """How much the answer loss prefers the gold passage on the training rows."""
    gold = gold_indices(rows)
    ce = table.cross_entropy
    gold_ce = ce[torch.arange(len(rows)), gold]
    others = ce.masked_fill(torch.nn.functional.one_hot(gold, N_CANDIDATES).bool(), float("nan"))
    return {
        "ce_gold": gold_ce.mean().item(),
        "ce_distractor": others.nanmean().item(),
        "ce_gap_distractor_minus_gold": (others.nanmean(dim=1) - gold_ce).mean().item(),
        "answer_loss_argmin_is_gold": (ce.argmin(dim=1) == gold).float().mean().item(),
    }


# --------------------------------------------------------------------------------------------------------------
# The rung


def build_frozen_parts(args: argparse.Namespace) -> dict:
    """Rows, memory, the answer table and the held-out F1 table: everything the runs share, cached in `args.work`."""
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = f"n{args.train_docs}_q{args.questions_per_doc}_h{args.heldout_rows}_f{args.f1_rows}_bf{int(args.bf16)}"
    path = work / f"frozen_{sizes}.pt"
    if path.is_file():
        parts = torch.load(path)
        parts["table"] = AnswerTable(**parts["table"])
        return parts
    train_rows = candidate_rows(training_records(data, args.train_docs), args.questions_per_doc, seed=1)
    heldout = read_jsonl(data / "heldout_qa.jsonl")[: args.heldout_rows]
    heldout = [{**row, "answer": row["gold_answer"]} for row in heldout]
    model = load_rung_model(args.model, "encoder")
    texts = [doc for row in train_rows + heldout for doc in row["docs"]]
    memory = candidate_memory(model, texts, work / "candidate_memory.pt")
    started = time.perf_counter()
    table = answer_table(model, train_rows, memory, bf16=args.bf16)
    answer_seconds = time.perf_counter() - started
    started = time.perf_counter()
    f1 = f1_table(model, heldout[: args.f1_rows], memory)
    parts = {
        "train_rows": train_rows, "heldout": heldout, "memory": {t: memory[t] for t in dict.fromkeys(texts)},
        "table": table, "f1": f1,
        "seconds": {"answer_table": answer_seconds, "f1_table": time.perf_counter() - started},
    }
    torch.save({**parts, "table": vars(table)}, path)
    return parts


def run_rung(args: argparse.Namespace) -> dict:
    parts = build_frozen_parts(args)
    train_rows, heldout, memory, table, f1 = (parts[k] for k in ("train_rows", "heldout", "memory", "table", "f1"))
    torch.manual_seed(args.seed)  # LoRA dropout draws
    model = load_rung_model(args.model, args.init)
    f1_rows = heldout[: len(f1)]

    def measure(prefix: str) -> dict:
        top = rankings(model, heldout, memory)
        measured = {f"recall_at_1_{prefix}": recall_at_1(top, heldout)}
        if len(f1):
            measured[f"f1_{prefix}"] = f1[torch.arange(len(f1)), top[: len(f1)]].mean().item()
        return measured

    result = {
        "arm": args.arm, "temperature": args.temperature, "seed": args.seed, "init": args.init, "steps": args.steps,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "train_rows": len(train_rows),
        "heldout_rows": len(heldout), "f1_rows": len(f1_rows),
        **table_summary(table, train_rows),
    }
    if len(f1):
        result["f1_gold"] = f1[torch.arange(len(f1)), gold_indices(f1_rows)].mean().item()
        result["f1_mean_over_candidates"] = f1.mean().item()
    # The untrained query reasoner is the same in every run of an init: measured once.
    before_path = Path(args.work) / f"before_{args.init}_h{len(heldout)}_f{len(f1)}.json"
    if not before_path.is_file():
        before_path.write_text(json.dumps(measure("before")))
    result.update(json.loads(before_path.read_text()))
    started = time.perf_counter()
    log = train_query_reasoner(
        model, train_rows, table, memory, args.arm, args.temperature, args.steps, args.batch_size, args.learning_rate,
        args.seed, args.bf16,
    )
    result["train_seconds"] = round(time.perf_counter() - started, 1)
    result.update(measure("after"))
    result["log"] = log
    return result


def add_rung_options(parser: argparse.ArgumentParser) -> None:
    """The options every run on the rung's questions shares: data, frozen parts and the training budget."""
    parser.add_argument(
        "--data", required=True, help="prepare_data.py output (stage1_pretrain.jsonl, heldout_qa.jsonl)"
    )
    parser.add_argument("--work", default=None, help="cache folder for memory and tables (default: <data>/topk)")
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--temperature", type=float, default=0.02, help="top-k (and InfoNCE) temperature")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-docs", type=int, default=100, help="training passages (gold and distractor pool)")
    parser.add_argument("--questions-per-doc", type=int, default=1)
    parser.add_argument("--heldout-rows", type=int, default=160, help="held-out questions for Recall@1")
    parser.add_argument("--f1-rows", type=int, default=60, help="held-out questions answered for F1")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast for the answer table and training (measurements stay fp32)")
    parser.add_argument("--output", default=None, help="write the result as JSON here")


def finish_rung_options(args: argparse.Namespace) -> argparse.Namespace:
    if args.work is None:
        args.work = str(Path(args.data) / "topk")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rung_options(parser)
    parser.add_argument("--arm", choices=ARMS, default="answer")
    parser.add_argument("--init", choices=QUERY_REASONER_INITS, default="encoder")
    return finish_rung_options(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run_rung(args)
    logger.warning(json.dumps({key: value for key, value in result.items() if key != "log"}))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
