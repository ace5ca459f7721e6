"""Joint training through the top-k, without labels: what the answer loss does to retrieval and to grounding when it
trains the query reasoner and the generator together (issue requirement 4; the rung trains the query reasoner alone).

The set-up is the rung's (`rung.py`: the shipped model, its compressor frozen and its memory computed once, a fresh
query reasoner, the same 100 training questions with 4 candidates each, the same held-out questions), but every step
runs the model's own end-to-end forward and backward: the generator (decoder adapter) reads the top-1 candidate and
trains on the answer loss with the query reasoner (`retrieval_weight 0`; `pos_index` only measures).

Measured before and after, on held-out questions: Recall@1 among the 4 (the query reasoner) and, reading each
candidate alone, the generator's answer cross-entropy and greedy F1 for the gold passage against the others
(grounding: how much better it answers from the right memory than from a wrong one), and F1 through the learned top 1.

    python -m research.topk.joint --data runs/topk/data --temperature 0.02 --seed 0 --output runs/topk/joint.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging

from modeling_clara.data import make_collator
from modeling_clara.modeling_clara import per_example_cross_entropy
from modeling_clara.training import ClaraTrainingArguments, prepare_model_for_stage

from modeling_clara.configuration_clara import QUERY_REASONER_ADAPTER
from research.topk.rung import (
    N_CANDIDATES,
    autocast,
    build_frozen_parts,
    f1_table,
    gold_indices,
    add_rung_options,
    finish_rung_options,
    load_rung_model,
    rankings,
    recall_at_1,
    shuffled_batches,
    single_candidate_rows,
)

logger = logging.get_logger("clara.research.topk")


@torch.no_grad()
def candidate_cross_entropy(model, rows: list[dict], memory: dict[str, torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """`(n_rows, n_candidates)`: the answer's mean token cross-entropy reading each candidate alone (no gradient)."""
    model.eval()
    collator = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory)
    single = single_candidate_rows(rows)
    losses = []
    for start in logging.tqdm(range(0, len(single), batch_size), desc="Cross-entropy table"):
        batch = collator(single[start : start + batch_size])
        batch.pop("positive_mask")
        losses.append(per_example_cross_entropy(model(**batch).logits, batch["labels"]))
    return torch.cat(losses).view(len(rows), N_CANDIDATES)


def grounding(cross_entropy: torch.Tensor, f1: torch.Tensor, rows: list[dict]) -> dict:
    """Gold against the other candidates, per row: cross-entropy gap (nats per token) and F1."""
    gold = gold_indices(rows)
    is_gold = torch.nn.functional.one_hot(gold, N_CANDIDATES).bool()
    every_row = torch.arange(len(rows))
    return {
        "ce_gold": cross_entropy[every_row, gold].mean().item(),
        "ce_gap_others_minus_gold": (cross_entropy.masked_fill(is_gold, float("nan")).nanmean(dim=1)
                                     - cross_entropy[every_row, gold]).mean().item(),
        "f1_gold": f1[every_row, gold].mean().item(),
        "f1_others": f1.masked_fill(is_gold, float("nan")).nanmean().item(),
    }


def train_jointly(model, rows: list[dict], memory: dict[str, torch.Tensor], temperature: float, steps: int,
                  batch_size: int, query_reasoner_rate: float, generator_rate: float, seed: int, bf16: bool) -> list[dict]:
    """AdamW (Apple's betas, no weight decay, constant rates) on the query reasoner and the generator, through the
    model's end-to-end forward with the answer loss alone; returns a per-step log."""
    with tempfile.TemporaryDirectory() as output_dir:
        prepare_model_for_stage(model, ClaraTrainingArguments(
            output_dir=output_dir, stage="e2e", retrieval_weight=0.0, topk_temperature=temperature,
            generation_top_k=1, report_to="none",
        ))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    reasoner = [p for name, p in trainable if f".{QUERY_REASONER_ADAPTER}." in name]
    generator = [p for name, p in trainable if f".{QUERY_REASONER_ADAPTER}." not in name]
    optimizer = torch.optim.AdamW(
        [{"params": reasoner, "lr": query_reasoner_rate}, {"params": generator, "lr": generator_rate}],
        betas=(0.9, 0.95), weight_decay=0.0,
    )
    collator = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory)
    log = []
    model.train()
    batches = shuffled_batches(len(rows), batch_size, seed)
    for step in logging.tqdm(range(steps), desc=f"joint t={temperature}"):
        batch = collator([rows[i] for i in next(batches)])
        with autocast(model, bf16):
            outputs = model(**batch)
        top = outputs.topk_indices[:, 0]
        optimizer.zero_grad()
        outputs.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(reasoner + generator, 1.0).item()
        optimizer.step()
        log.append({
            "step": step + 1, "answer_ce": outputs.ce_loss.item(), "grad_norm": grad_norm,
            "batch_recall_at_1": batch["positive_mask"][torch.arange(len(top)), top].float().mean().item(),
        })
    model.eval()
    return log


def measure(model, heldout: list[dict], f1_rows: list[dict], memory: dict[str, torch.Tensor], f1=None) -> dict:
    """Recall@1 (all held-out rows), grounding and F1 through the learned top 1 (the F1 rows)."""
    top = rankings(model, heldout, memory)
    f1 = f1_table(model, f1_rows, memory) if f1 is None else f1
    measured = grounding(candidate_cross_entropy(model, f1_rows, memory), f1, f1_rows)
    measured["recall_at_1"] = recall_at_1(top, heldout)
    measured["f1_top1"] = f1[torch.arange(len(f1_rows)), top[: len(f1_rows)]].mean().item()
    return measured


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rung_options(parser)
    parser.add_argument("--generator-learning-rate", type=float, default=5e-5,
                        help="the generator's rate (the small recipe's e2e rate); --learning-rate is the query reasoner's")
    args = finish_rung_options(parser.parse_args(argv))
    parts = build_frozen_parts(args)  # the rung's rows, memory and the shipped generator's F1 table, cached
    heldout, memory = parts["heldout"], parts["memory"]
    f1_rows = heldout[: len(parts["f1"])]
    torch.manual_seed(args.seed)
    model = load_rung_model(args.model, "fresh")
    result = {"temperature": args.temperature, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
              "query_reasoner_learning_rate": args.learning_rate,
              "generator_learning_rate": args.generator_learning_rate, "heldout_rows": len(heldout),
              "f1_rows": len(f1_rows)}
    result["before"] = measure(model, heldout, f1_rows, memory, f1=parts["f1"])
    started = time.perf_counter()
    log = train_jointly(model, parts["train_rows"], memory, args.temperature, args.steps, args.batch_size,
                        args.learning_rate, args.generator_learning_rate, args.seed, args.bf16)
    result["train_seconds"] = round(time.perf_counter() - started, 1)
    result["after"] = measure(model, heldout, f1_rows, memory)
    logger.warning(json.dumps(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({**result, "log": log}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
