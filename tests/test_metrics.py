"""QA metrics on hand-checked examples, and the `evaluate` module loading offline."""

import subprocess
import sys

import evaluate
import pytest

from modeling_clara.metrics import (
    CLARA_QA_METRIC_PATH,
    cover_exact_match,
    exact_match,
    normalize_answer,
    recall_at_k,
    score_example,
    token_f1,
)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear; the plum ", "apple pear plum"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("Zürich — Café", "zürich — café"),  # non-ASCII letters kept; the em dash is not string.punctuation
        ("U.S.A.", "usa"),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_token_f1_by_hand():
    # prediction tokens [eiffel, tower, in, paris] vs gold [eiffel, tower]: P = 2/4, R = 2/2, F1 = 2/3
    assert token_f1("the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    # [eiffel, tower, paris] vs [eiffel, tower]: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Eiffel Tower, Paris", "the Eiffel Tower") == pytest.approx(0.8)
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "London") == 0.0


def test_yes_no_rule_and_boolean_mapping():
    assert token_f1("yes", "no") == 0.0
    assert token_f1("no it is not", "no") == 0.0  # gold is "no", prediction normalises to something else
    assert token_f1("True", "yes") == 1.0 and exact_match("False", "no") == 1.0
    assert token_f1("yes", "yes") == 1.0


def test_cover_exact_match_partial_and_full():
    assert cover_exact_match("It was built by Gustave Eiffel in 1889", "Gustave Eiffel") == 1.0
    assert cover_exact_match("It was built by Eiffel", "Gustave Eiffel") == 0.0
    assert exact_match("It was built by Gustave Eiffel", "Gustave Eiffel") == 0.0


def test_protocols_on_multiple_answers():
    scores = score_example("Big Apple", ["New York City", "Big Apple"])
    assert scores["apple_em"] == 0.0 and scores["em"] == 1.0  # Apple's protocol reads only the first answer
    assert scores["apple_f1"] == 0.0 and scores["f1"] == 1.0
    assert scores["cover_em"] == 1.0


def test_evaluate_module_loads_offline_and_matches_functions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = evaluate.load(CLARA_QA_METRIC_PATH)
    predictions = ["Paris", "the Eiffel tower", "no"]
    references = [["Paris", "Paris, France"], ["Eiffel Tower in Paris", "Eiffel Tower"], ["yes"]]
    result = metric.compute(predictions=predictions, references=references)
    per_example = [score_example(p, r) for p, r in zip(predictions, references)]
    for key, value in result.items():
        assert value == pytest.approx(sum(s[key] for s in per_example) / 3)
    assert result["em"] == pytest.approx(2 / 3) and result["apple_em"] == pytest.approx(1 / 3)


def test_scoring_and_synthesis_need_no_evaluate():
    """`clara synthesize` verifies answers with token F1 on a base install: the scores import no eval extra."""
    check = ("import sys; import modeling_clara.metrics, modeling_clara.synthesis, modeling_clara.cli.synthesize; "
             "print(sorted(m for m in ('evaluate', 'modeling_clara.index') if m in sys.modules))")
    process = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip() == "[]"


def test_bad_input():
    with pytest.raises(ValueError, match="answers must be a non-empty list"):
        score_example("x", [])
    with pytest.raises(TypeError, match="prediction must be a str"):
        score_example(None, ["x"])
    with pytest.raises(ValueError, match=r"predictions \(1\) and references \(2\)"):
        evaluate.load(CLARA_QA_METRIC_PATH).compute(predictions=["a"], references=[["a"], ["b"]])


def test_recall_at_k():
    assert recall_at_k([3, 1, 0, 2], positives=[1, 2], k=1) == 0.0
    assert recall_at_k([3, 1, 0, 2], positives=[1, 2], k=3) == 0.5
    assert recall_at_k([3, 1, 0, 2], positives=[1, 2], k=4) == 1.0
    with pytest.raises(ValueError, match="positives"):
        recall_at_k([0], positives=[], k=1)
