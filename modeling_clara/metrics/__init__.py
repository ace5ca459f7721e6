"""Evaluation metrics: the QA scores as plain functions (no extra needed), and `CLARA_QA_METRIC_PATH`, which
`evaluate.load(CLARA_QA_METRIC_PATH)` loads offline as an `evaluate` module (the eval extra)."""

from pathlib import Path

from .clara_qa.scores import cover_exact_match, exact_match, normalize_answer, recall_at_k, score_example, token_f1

CLARA_QA_METRIC_PATH = str(Path(__file__).resolve().parent / "clara_qa")

__all__ = [
    "CLARA_QA_METRIC_PATH", "cover_exact_match", "exact_match", "normalize_answer", "recall_at_k", "score_example",
    "token_f1",
]
