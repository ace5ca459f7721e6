"""EM, token F1, Cover-EM and Recall@k: pure functions, no dependency beyond the standard library.

`clara eval` scores with them, `clara synthesize` verifies generated answers with `token_f1`, and `clara_qa.py` beside
this file wraps them as an `evaluate` module. Two protocols:

- Apple's (keys `apple_*`, apple/ml-clara `evaluation/evaluate.py`): against the first gold answer only;
  "True"/"False" read as "yes"/"no"; F1 is 0 when either side is yes/no/noanswer and they differ.
- Max (keys `em`, `f1`, `cover_em`): the same per-answer scores, maximised over all accepted answers.

Scores are fractions in [0, 1].
"""

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_BOOLEANS = {"True": "yes", "False": "no"}
_CLOSED_ANSWERS = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _normalized(text: str) -> str:
    return normalize_answer(_BOOLEANS.get(text, text))


def exact_match(prediction: str, answer: str) -> float:
    return float(_normalized(prediction) == _normalized(answer))


def cover_exact_match(prediction: str, answer: str) -> float:
    """1 when every normalised token of the answer appears among the prediction's tokens."""
    predicted = set(_normalized(prediction).split())
    return float(all(token in predicted for token in _normalized(answer).split()))


def token_f1(prediction: str, answer: str) -> float:
    predicted, gold = _normalized(prediction), _normalized(answer)
    if (predicted in _CLOSED_ANSWERS or gold in _CLOSED_ANSWERS) and predicted != gold:
        return 0.0
    common = sum((Counter(predicted.split()) & Counter(gold.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted.split()), common / len(gold.split())
    return 2 * precision * recall / (precision + recall)


SCORERS = {"em": exact_match, "f1": token_f1, "cover_em": cover_exact_match}


def score_example(prediction: str, answers: list[str]) -> dict[str, float]:
    """Both protocols for one example: `apple_*` against `answers[0]`, the others maximised over `answers`."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}: {prediction!r:.80}")
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or not answers:
        raise ValueError(f"answers must be a non-empty list of str, got {answers!r:.80}")
    if not all(isinstance(a, str) for a in answers):
        raise TypeError(f"answers must all be str, got {answers!r:.80}")
    scores = {f"apple_{name}": scorer(prediction, answers[0]) for name, scorer in SCORERS.items()}
    scores.update({name: max(scorer(prediction, a) for a in answers) for name, scorer in SCORERS.items()})
    return scores


def recall_at_k(ranked_indices: list[int], positives: list[int], k: int) -> float:
    """|top-k of the ranking ∩ positives| / |positives|."""
    if not positives:
        raise ValueError(f"positives must be a non-empty list of candidate indices, got {positives!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(ranked_indices[:k]) & set(positives)) / len(set(positives))


__all__ = [
    "SCORERS", "cover_exact_match", "exact_match", "normalize_answer", "recall_at_k", "score_example", "token_f1",
]
