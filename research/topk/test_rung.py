"""The top-k rung's shortcut is the model's own gradient, and the rung's claim at its shortest budget."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_clara.data import make_collator
from research.topk.rung import (
    SHIPPED_MODEL,
    AnswerTable,
    answer_table,
    candidate_memory,
    load_rung_model,
    parse_args,
    per_example_cross_entropy,
    prepare_query_reasoner_training,
    run_rung,
    straight_through_answer_loss,
)

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {
        "question": "Which river runs through the town of Harlow Creek?",
        "docs": [
            "Harlow Creek is a market town on the river Tamsin, known for its stone bridge and its Tuesday fair.",
            "The Ordley viaduct carries the northern railway over a dry valley; it was finished in 1871.",
            "Mount Pellan is the highest peak of the Vesker range and is climbed from the village of Anst.",
            "The Brisk Orchestra was founded in 1921 by the violinist Clara Moon and plays in the Corn Hall.",
        ],
        "answer": "the Tamsin",
        "pos_index": [0],
    },
    {
        "question": "Who founded the Brisk Orchestra?",
        "docs": [
            "Mount Pellan is the highest peak of the Vesker range and is climbed from the village of Anst.",
            "The Brisk Orchestra was founded in 1921 by the violinist Clara Moon and plays in the Corn Hall.",
            "Harlow Creek is a market town on the river Tamsin, known for its stone bridge and its Tuesday fair.",
            "The Ordley viaduct carries the northern railway over a dry valley; it was finished in 1871.",
        ],
        "answer": "Clara Moon",
        "pos_index": [1],
    },
]


@pytest.fixture(scope="module")
def rung_model(tmp_path_factory):
    model = load_rung_model(SHIPPED_MODEL, "encoder")
    memory = candidate_memory(model, [doc for row in ROWS for doc in row["docs"]], cache_path=None)
    return model, memory


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.02, 1.0])
def test_straight_through_shortcut_equals_the_models_gradient(rung_model, tmp_path, temperature):
    """The rung trains on the answer table's gradients; they must equal back-propagating the answer loss through the
    model's forward (generator reading the top-1 the straight-through top-k picks) into the query reasoner."""
    model, memory = rung_model
    table = answer_table(model, ROWS, memory)
    prepare_query_reasoner_training(model, temperature, str(tmp_path))
    model.eval()  # no LoRA dropout: both passes must draw the same query states
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert parameters, "the query reasoner must be trainable"

    batch = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory)(ROWS)
    outputs = model(**batch)
    per_example_cross_entropy(outputs.logits, batch["labels"]).sum().backward()
    through_model = [p.grad.clone() for p in parameters]
    model.zero_grad()

    scores_batch = make_collator("e2e", model.processor, top_k=1, candidate_memory=memory, retrieval_only=True)(ROWS)
    scores = model(**scores_batch).retrieval_scores
    surrogate, cross_entropy, top = straight_through_answer_loss(
        scores, temperature, scores_batch["candidate_embeds"], AnswerTable(table.cross_entropy, table.gradient)
    )
    surrogate.sum().backward()
    shortcut = [p.grad.clone() for p in parameters]
    model.zero_grad()

    torch.testing.assert_close(top, outputs.topk_indices[:, 0])
    torch.testing.assert_close(cross_entropy, per_example_cross_entropy(outputs.logits, batch["labels"]).detach())
    total = torch.cat([g.flatten() for g in through_model])
    assert total.norm() > 0, "the answer loss must reach the query reasoner"
    tolerance = 1e-6 + 1e-3 * total.abs().max().item()
    torch.testing.assert_close(torch.cat([g.flatten() for g in shortcut]), total, atol=tolerance, rtol=1e-3)


@pytest.mark.slow
def test_answer_loss_alone_teaches_the_query_reasoner(tmp_path):
    """A fresh query reasoner (bare-backbone queries, Recall@1 near chance) trained on the answer loss alone through
    the straight-through top-k ranks held-out gold passages first far above chance (README: 0.331 -> 0.869 at the
    rung's default budget, seed 0; this budget, 40 training questions, 20 steps x 8, 80 held-out questions, seed 1,
    gave 0.300 -> 0.438, one seed: the assertion asks for chance + 0.10, about 1.6 standard errors under it)."""
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "examples/shipped_model/prepare_data.py", "--source",
         "tests/fixtures/data/clara_pretrain_sample.jsonl", "--out-dir", str(data), "--instruct-docs", "2",
         "--e2e-candidates", "4", "--reconstruction"],
        cwd=ROOT, check=True,
    )
    result = run_rung(parse_args([
        "--data", str(data), "--work", str(tmp_path / "work"), "--init", "fresh", "--arm", "answer",
        "--temperature", "0.02", "--seed", "1", "--train-docs", "40", "--heldout-rows", "80", "--f1-rows", "0",
        "--steps", "20", "--batch-size", "8", "--learning-rate", "3e-4",
    ]))
    assert all("batch_recall_at_1" in entry and "infonce" in entry for entry in result["log"])
    assert result["recall_at_1_before"] < 0.45, "a fresh query reasoner should start near chance (0.25)"
    assert result["recall_at_1_after"] >= 0.25 + 0.10, result
