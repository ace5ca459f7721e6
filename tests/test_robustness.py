"""Rows of README's "What happens when..." table not covered by the feature test files."""

import json

import pytest
from conftest import make_tiny_clara

from modeling_clara.cli import main as clara_main

DOCS = ["The Seine flows through Paris.", "Kilimanjaro is in Tanzania.", "Coral reefs need warm water."]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return make_tiny_clara(tiny_llama_dir)


def test_an_extremely_long_question(model, caplog):
    embeds = model.compress(DOCS)
    question = "why " * 3000
    # Retrieval reads the question like a document: cut at doc_max_length, with a warning that counts it.
    scores, _ = model.retrieve(question, embeds, k=2)
    assert len(scores) == 2 and "1 of 1 questions are longer than doc_max_length" in caplog.text
    # The generator never silently drops part of the question: too long for its context is an error before generate.
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens, more than max_length"):
        model.answer(question, embeds)


@pytest.mark.parametrize("text", [
    "Control \x00\x07\x1b characters\tand\r\nbreaks",
    "Mixed scripts: 中文 العربية кириллица हिन्दी 🙂 \u202eRTL override",
])
def test_control_characters_and_mixed_scripts_work(model, text):
    embeds = model.compress([text, *DOCS])
    assert embeds.isfinite().all()
    assert isinstance(model.answer(text, embeds, k=2), str)
    assert len(model.retrieve(text, embeds, k=2)[1]) == 2


def test_k_larger_than_the_candidates_returns_all_ranked(model):
    embeds = model.compress(DOCS)
    scores, indices = model.retrieve("Where is Kilimanjaro?", embeds, k=10)
    assert sorted(indices.tolist()) == [0, 1, 2] and scores.tolist() == sorted(scores.tolist(), reverse=True)


def test_doc_embeds_of_another_dtype_are_cast_not_rejected(model):
    embeds = model.compress(DOCS)
    assert model.answer("Where?", embeds.double()) == model.answer("Where?", embeds)


def test_cli_errors_name_the_file_and_line(tmp_path, model):
    model.save_pretrained(tmp_path / "model")
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"question": "q", "docs": ["d"], "answers": ["a"]}) + "\n" + '{"question": 3}\n')
    with pytest.raises(ValueError, match=rf"{data}:2: `question` must be a non-empty str"):
        clara_main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        clara_main(["index", "build", "--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "missing.jsonl"),
                    "--output-dir", str(tmp_path / "idx")])
    # The index commands end a user's mistake with one line naming it (SystemExit), not a traceback.
    with pytest.raises(SystemExit, match="not a CLaRa index"):
        clara_main(["index", "search", str(tmp_path), "a question", "--model", str(tmp_path / "model")])
