"""QA answer metrics of CLaRa's evaluation: EM, token F1 and Cover-EM, under two scoring protocols.

`evaluate.load("<path to this folder>")` loads it offline. The scores are the pure functions of `scores.py` beside
this file (`from modeling_clara.metrics import score_example` imports them without `evaluate`); this file imports
nothing else from the package, because `evaluate` copies the folder and runs it as a standalone script.

- Apple's protocol (keys `apple_*`, apple/ml-clara `evaluation/evaluate.py`): against the first gold answer
  only; "True"/"False" read as "yes"/"no"; F1 is 0 when either side is yes/no/noanswer and they differ.
- Max protocol (keys `em`, `f1`, `cover_em`): the same per-answer scores, maximised over all accepted answers.

Scores are fractions in [0, 1], averaged over examples.
"""

import datasets
import evaluate

# A single-dot import of a file beside this one: `evaluate` copies it along (`evaluate.loading.get_imports`).
from .scores import score_example

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): Generated answers.
    references (`list[list[str]]`): Accepted answers per example, the gold answer first.
Returns:
    dict with `apple_em`, `apple_f1`, `apple_cover_em` (first gold answer) and `em`, `f1`, `cover_em` (best
    accepted answer), each the mean over examples in [0, 1].
"""
_CITATION = "CLaRa, arXiv 2511.18659; SQuAD answer normalisation (Rajpurkar et al., 2016)."


class ClaraQA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
        if not predictions:
            raise ValueError("predictions is empty")
        per_example = [score_example(p, list(r)) for p, r in zip(predictions, references)]
        return {key: sum(s[key] for s in per_example) / len(per_example) for key in per_example[0]}
