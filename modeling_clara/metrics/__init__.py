"""Evaluation metrics; `CLARA_QA_METRIC_PATH` loads with `evaluate.load(CLARA_QA_METRIC_PATH)`, offline."""

from pathlib import Path

CLARA_QA_METRIC_PATH = str(Path(__file__).resolve().parent / "clara_qa")

__all__ = ["CLARA_QA_METRIC_PATH"]
