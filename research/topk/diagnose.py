"""What the answer loss tells the query reasoner through the straight-through top-k, on the rung's training rows.

For the untrained query reasoner (a copy of the encoder adapter) and each temperature:

- `p_top`: the softmax weight of the selected candidate (how saturated the soft selection is),
- `score_gradient_gold_minus_others`: d(-loss)/d score_gold minus the mean over the other candidates, per row; positive
  means the step raises the gold passage (`share_pushing_gold_up`: the share of rows where it is positive),
- `query_reasoner_gradient_norm`: the gradient norm on the query reasoner's LoRA weights (answer loss, and InfoNCE),

and, independent of temperature, how well the straight-through's first-order estimate of the loss change from reading
candidate n instead of the selected one (<g_selected, memory_n - memory_selected>) predicts the true change
(cross-entropy_n - cross-entropy_selected): their correlation and sign agreement over the distractor/gold pairs.

    python -m research.topk.diagnose --data runs/topk/data --output runs/topk/diagnose.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from modeling_clara.data import make_collator
from research.topk.rung import (
    N_CANDIDATES,
    AnswerTable,
    build_frozen_parts,
    gold_indices,
    load_rung_model,
    parse_args,
    prepare_query_reasoner_training,
    straight_through_answer_loss,
    table_summary,
)


def linearisation_quality(table: AnswerTable, rows: list[dict], memory: dict, selected: torch.Tensor) -> dict:
    """Predicted (first-order) vs true change of the answer loss when candidate n replaces the selected one."""
    predicted, true = [], []
    for i, row in enumerate(rows):
        embeds = torch.stack([memory[doc] for doc in row["docs"]]).float()  # (n, n_mem, hidden)
        top = int(selected[i])
        g = table.gradient[i, top].float()
        for n in range(N_CANDIDATES):
            if n != top:
                predicted.append(torch.sum(g * (embeds[n] - embeds[top])).item())
                true.append((table.cross_entropy[i, n] - table.cross_entropy[i, top]).item())
    predicted, true = torch.tensor(predicted), torch.tensor(true)
    correlation = torch.corrcoef(torch.stack([predicted, true]))[0, 1].item()
    return {
        "pairs": len(true),
        "correlation_predicted_true_loss_change": correlation,
        "sign_agreement": (torch.sign(predicted) == torch.sign(true)).float().mean().item(),
        "mean_abs_true_change": true.abs().mean().item(),
        "mean_abs_predicted_change": predicted.abs().mean().item(),
    }


def gradients_at(model, rows, memory, table: AnswerTable, temperature: float, batch_size: int = 20) -> dict:
    """The straight-through answer loss's and InfoNCE's gradients at the untrained query reasoner, at `temperature`."""
    with tempfile.TemporaryDirectory() as output_dir:
        prepare_query_reasoner_training(model, temperature, output_dir)
    model.eval()  # the gradient itself, without dropout noise
    parameters = [p for p in model.parameters() if p.requires_grad]
    collator = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory, retrieval_only=True)
    p_top, gold_push, answer_norms, infonce_norms = [], [], [], []
    for start in range(0, len(rows), batch_size):
        picked = list(range(start, min(start + batch_size, len(rows))))
        batch = collator([rows[i] for i in picked])
        outputs = model(**batch)
        scores = outputs.retrieval_scores
        scores.retain_grad()
        surrogate, _, top = straight_through_answer_loss(
            scores, temperature, batch["candidate_embeds"],
            AnswerTable(table.cross_entropy[picked], table.gradient[picked]),
        )
        model.zero_grad()
        surrogate.mean().backward(retain_graph=True)
        answer_norms.append(torch.cat([p.grad.flatten() for p in parameters]).norm().item())
        downhill = -scores.grad  # (batch, n): how the answer loss wants each score to move
        gold = gold_indices([rows[i] for i in picked])
        is_gold = torch.nn.functional.one_hot(gold, N_CANDIDATES).bool()
        gold_push += (downhill[is_gold] - downhill.masked_fill(is_gold, 0).sum(1) / (N_CANDIDATES - 1)).tolist()
        p_top += torch.softmax(scores.detach() / temperature, dim=-1).max(dim=-1).values.tolist()
        model.zero_grad()
        outputs.retrieval_loss.backward()
        infonce_norms.append(torch.cat([p.grad.flatten() for p in parameters]).norm().item())
        model.zero_grad()
    gold_push = torch.tensor(gold_push)
    return {
        "temperature": temperature,
        "p_top": sum(p_top) / len(p_top),
        "score_gradient_gold_minus_others": gold_push.mean().item(),
        "share_pushing_gold_up": (gold_push > 0).float().mean().item(),
        "query_reasoner_gradient_norm_answer": sum(answer_norms) / len(answer_norms),
        "query_reasoner_gradient_norm_infonce": sum(infonce_norms) / len(infonce_norms),
    }


@torch.no_grad()
def initial_selection(model, rows, memory) -> tuple[torch.Tensor, torch.Tensor]:
    """The untrained query reasoner's top-1 per row and the cosine gap between its first and second candidate."""
    model.eval()
    tops, gaps = [], []
    for row in rows:
        embeds = torch.stack([memory[doc] for doc in row["docs"]])
        scores, indices = model.retrieve(row["question"], embeds, k=2)
        tops.append(int(indices[0]))
        gaps.append((scores[0] - scores[1]).item())
    return torch.tensor(tops), torch.tensor(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.1, 1.0])
    parser.add_argument("--rows", type=int, default=40, help="training rows to measure the gradients on")
    own, rest = parser.parse_known_args()
    args = parse_args(rest)
    parts = build_frozen_parts(args)
    rows, memory, table = parts["train_rows"], parts["memory"], parts["table"]
    model = load_rung_model(args.model, args.init)
    selected, gaps = initial_selection(model, rows, memory)
    few = AnswerTable(table.cross_entropy[: own.rows], table.gradient[: own.rows])
    gold = gold_indices(rows)
    result = {
        "init": args.init,
        "rows": len(rows),
        "gradient_rows": min(own.rows, len(rows)),
        **table_summary(table, rows),
        "initial_recall_at_1_train": (selected == gold).float().mean().item(),
        "initial_cosine_gap_first_second": gaps.mean().item(),
        "answer_loss_of_initial_selection": table.cross_entropy[torch.arange(len(rows)), selected].mean().item(),
        "linearisation": linearisation_quality(table, rows, memory, selected),
        "per_temperature": [gradients_at(model, rows[: own.rows], memory, few, t) for t in own.temperatures],
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
