"""Stage-1 data synthesis: parsing, verification, coverage, resume, the HTTP generator (against a stub server on
127.0.0.1) and a real run of the embedded generator over passages of ../shared/data."""

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import DATA_DIR
from hypothesis import given
from hypothesis import strategies as st

from modeling_clara.data import load_clara_jsonl
from modeling_clara.synthesis import (
    OUTPUT_FILE,
    PROMPTS,
    LocalGenerator,
    OpenAICompatibleGenerator,
    SynthesisConfig,
    parse_paraphrase,
    parse_qa_pairs,
    passage_sentences,
    progress_path,
    synthesize,
    uncovered_sentences,
    verification_decision,
)

# ----------------------------------------------------------------------------------------------------------------
# Parsing generator output


@pytest.mark.parametrize("text, expected", [
    ("Q: Who wrote it?\nA: Tolkien", [("Who wrote it?", "Tolkien")]),
    ("1. Q: Who?\n   A: Him\n2) Q: When?\nA: 1954", [("Who?", "Him"), ("When?", "1954")]),
    ("**Question 1:** Where is it\nset?\n**Answer 1:** Middle-earth", [("Where is it set?", "Middle-earth")]),
    ("Sure! Here are the pairs:\n\n- Q1: x?\n- A1: y\n\nHope this helps.", [("x?", "y")]),
    ("question: lower case?\nanswer: fine", [("lower case?", "fine")]),
])
def test_well_formed_pairs_are_parsed(text, expected):
    assert parse_qa_pairs(text) == (expected, 0)


@pytest.mark.parametrize("text, n_pairs, n_malformed", [
    ("A: an answer with no question", 0, 1),
    ("Q: a question with no answer", 0, 1),
    ("Q: empty answer?\nA:   \nQ: good?\nA: yes", 1, 1),
    ("Q: one?\nA: a\nA: a second answer", 1, 1),
    ("no pairs at all, just prose", 0, 0),
    ("", 0, 0),
])
def test_malformed_pieces_are_skipped_and_counted(text, n_pairs, n_malformed):
    pairs, malformed = parse_qa_pairs(text)
    assert (len(pairs), malformed) == (n_pairs, n_malformed)


@given(st.text())
def test_parsing_never_raises_and_returns_non_empty_fields(text):
    pairs, malformed = parse_qa_pairs(text)
    assert malformed >= 0
    assert all(q.strip() and a.strip() for q, a in pairs)


PASSAGE = ("The Eiffel Tower was completed in 1889 for the World's Fair. It was designed by the engineering company "
           "of Gustave Eiffel. Paris")


def test_paraphrase_checks():
    rewrite = "Gustave Eiffel's company designed the tower in Paris, finished in 1889 for a world exhibition."
    assert parse_paraphrase(rewrite, PASSAGE, 0.5, 0.9) == rewrite
    assert parse_paraphrase("Here is the rewritten passage:\n" + rewrite, PASSAGE, 0.5, 0.9) == rewrite
    assert parse_paraphrase("Eiffel Tower\n\nRewritten passage:\n" + rewrite, PASSAGE, 0.5, 0.9) == (
        "Eiffel Tower\n\n" + rewrite
    )
    assert parse_paraphrase(PASSAGE + " ", PASSAGE, 0.5, 0.9) is None  # a copy
    assert parse_paraphrase("A tower in Paris.", PASSAGE, 0.5, 0.9) is None  # far shorter than the passage
    assert parse_paraphrase("   ", PASSAGE, 0.5, 0.9) is None


# ----------------------------------------------------------------------------------------------------------------
# Verification decisions and coverage


@pytest.mark.parametrize("answer, with_passage, closed_book, decision", [
    ("1889", "It was 1889.", None, "kept"),
    ("1889", "in 1889", "I don't know", "kept"),
    ("1889", "1887", None, "unverified"),
    ("Gustave Eiffel", "Eiffel", None, "kept"),  # F1 2/3 >= 0.5
    ("the engineering company of Gustave Eiffel", "Eiffel", None, "unverified"),  # F1 0.33
    ("1889", "1889", "1889", "closed_book"),
    ("1889", "1889", "The year 1889", "closed_book"),
])
def test_verification_decision(answer, with_passage, closed_book, decision):
    assert verification_decision(answer, with_passage, closed_book, threshold=0.5) == decision


def test_coverage_counts_sentences_that_contain_an_answer():
    assert passage_sentences(PASSAGE) == [
        "The Eiffel Tower was completed in 1889 for the World's Fair.",
        "It was designed by the engineering company of Gustave Eiffel.",
    ]  # "Paris" alone is a title, not a fact
    assert uncovered_sentences(PASSAGE, []) == passage_sentences(PASSAGE)
    assert uncovered_sentences(PASSAGE, ["1889"]) == passage_sentences(PASSAGE)[1:]
    assert uncovered_sentences(PASSAGE, ["1889", "Gustave Eiffel"]) == []
    assert uncovered_sentences(PASSAGE, ["Gustave Eiffel and 1889"]) == passage_sentences(PASSAGE)  # across two


@pytest.mark.parametrize("field, value", [
    ("n_simple", -1), ("f1_threshold", 1.5), ("max_new_tokens", 0), ("temperature", -0.1), ("max_paraphrase_f1", 2),
])
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SynthesisConfig(**{field: value})


# ----------------------------------------------------------------------------------------------------------------
# A deterministic OpenAI-compatible stub server on 127.0.0.1
#
# For every sentence of a passage it proposes "Q: What is stated about <first words>?" with the sentence's last
# word as the answer. When re-asked with the passage it answers correctly, except for questions about a passage's
# second sentence (-> unverified); without the passage it knows the answers about first sentences (-> closed book).


def _template_start(kind: str) -> str:
    return PROMPTS[kind].split("{")[0]


def _stub_pairs(passage: str) -> list[tuple[str, str]]:
    return [(f"What is stated about {' '.join(s.split()[:3])}?", s.split()[-1].strip(".")) for s in
            passage_sentences(passage)]


def _stub_reply(prompt: str) -> str:
    passage = prompt.split("Passage:\n", 1)[-1].split("\n\nQuestion:")[0]
    if prompt.startswith((_template_start("simple_qa"), _template_start("complex_qa"), _template_start("more_qa"))):
        lines = [f"Q: {q}\nA: {a}" for q, a in _stub_pairs(passage)]
        return "Here you go:\n" + "\n".join(lines) + "\nA: a stray answer"  # one malformed piece per reply
    if prompt.startswith(_template_start("paraphrase")):
        return " ".join(word.upper() + "x" for word in passage.split())
    question = prompt.rsplit("Question: ", 1)[-1]
    for corpus_passage in STUB_CORPUS:
        for position, (q, a) in enumerate(_stub_pairs(corpus_passage)):
            if q == question:
                if prompt.startswith(_template_start("answer_closed_book")):
                    return a if position == 0 else "I do not know."
                return "no idea" if position == 1 else f"{a}."
    return "unknown"


STUB_CORPUS = [
    "Alpha river flows through Bereg town. Its source lies in the Kaval mountains. It joins the Volna sea.",
    "Mira Sol wrote the novel Tide Glass. The book won the Orin prize. Sol was born in Lusk.",
    "The Tarn bridge opened in 1931. Engineers built it from granite. Tolls ended in 1970.",
    "Quill is a programming language. It compiles to bytecode. Its mascot is a heron.",
    "Dena Park hosts a spring fair. The fair sells local honey. Music plays until midnight.",
]


def _expected_kept(passage: str) -> list[tuple[str, str]]:
    """What the pipeline must keep from the stub: third and later sentences (first: closed book; second: wrong)."""
    return _stub_pairs(passage)[2:]


class _StubHandler(BaseHTTPRequestHandler):
    delay = 0.0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions" or body.get("model") != "stub":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "unknown model or path"}')
            return
        time.sleep(self.delay)
        reply = _stub_reply(body["messages"][-1]["content"])
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    _StubHandler.delay = 0.0


@pytest.fixture
def stub_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(STUB_CORPUS)))
    return path


def _read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_keeps_exactly_the_verified_pairs(stub_server, stub_corpus, tmp_path):
    out = tmp_path / "pretrain.jsonl"
    generator = OpenAICompatibleGenerator(stub_server, "stub")
    stats = synthesize(generator, stub_corpus, out, SynthesisConfig(n_complex=0), batch_size=2)
    rows = _read_rows(out)
    qa_rows = [r for r in rows if r["data_type"] == "qa"]
    assert [list(zip(r["question"], r["answers"])) for r in qa_rows] == [_expected_kept(t) for t in STUB_CORPUS]
    assert [r["docs"] for r in qa_rows] == [[t] for t in STUB_CORPUS]
    assert sum(r["data_type"] == "paraphrase" for r in rows) == len(STUB_CORPUS)
    n_pairs = sum(len(_stub_pairs(t)) for t in STUB_CORPUS)
    assert stats["qa_candidates"] == n_pairs  # the coverage round re-proposes the same questions: duplicates
    assert stats["qa_duplicate"] == n_pairs
    assert stats["qa_closed_book"] == stats["qa_unverified"] == len(STUB_CORPUS)
    assert stats["qa_kept"] + stats["qa_unverified"] + stats["qa_closed_book"] == stats["qa_candidates"]
    assert stats["qa_malformed"] == 2 * len(STUB_CORPUS)  # the stray answer of each QA reply
    assert stats["rows"] == len(rows) and stats["passages"] == len(STUB_CORPUS)
    dataset = load_clara_jsonl(out, stage="pretrain")
    assert dataset["task"].count("qa") == len(STUB_CORPUS) and dataset["task"].count("paraphrase") == len(STUB_CORPUS)


def test_closed_book_check_can_be_switched_off(stub_server, stub_corpus, tmp_path):
    config = SynthesisConfig(n_complex=0, closed_book_check=False, paraphrase=False, coverage_rounds=0)
    stats = synthesize(OpenAICompatibleGenerator(stub_server, "stub"), stub_corpus, tmp_path / "o.jsonl", config)
    assert stats["qa_closed_book"] == 0
    assert stats["qa_kept"] == sum(len(_stub_pairs(t)) - 1 for t in STUB_CORPUS)  # all but the wrong second ones


def test_endpoint_errors_name_the_url_and_status(stub_server, stub_corpus, tmp_path):
    with pytest.raises(RuntimeError, match=r"chat/completions answered HTTP 404"):
        synthesize(OpenAICompatibleGenerator(stub_server, "no-such-model"), stub_corpus, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="ftp://x"):
        OpenAICompatibleGenerator("ftp://x", "stub")


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_a_continued_run_equals_an_uninterrupted_one(stub_server, stub_corpus, tmp_path):
    generator = OpenAICompatibleGenerator(stub_server, "stub")
    reference, resumed = tmp_path / "reference.jsonl", tmp_path / "resumed.jsonl"
    full_stats = synthesize(generator, stub_corpus, reference, batch_size=2)
    synthesize(generator, stub_corpus, resumed, batch_size=2, limit=3)
    # A kill in the middle of the next passage: half its rows written, its progress line cut short.
    with resumed.open("a") as f:
        f.write('{"data_type": "qa", "question": ["half a row')
    with progress_path(resumed).open("a") as f:
        f.write('{"id": "p3", "end": 12')
    resumed_stats = synthesize(generator, stub_corpus, resumed, batch_size=2)
    assert resumed.read_bytes() == reference.read_bytes()
    assert resumed_stats == full_stats
    assert synthesize(generator, stub_corpus, resumed, batch_size=2) == full_stats  # nothing left: nothing redone
    assert resumed.read_bytes() == reference.read_bytes()


def test_resuming_with_other_settings_or_over_a_foreign_file_is_refused(stub_server, stub_corpus, tmp_path):
    generator = OpenAICompatibleGenerator(stub_server, "stub")
    out = tmp_path / "o.jsonl"
    synthesize(generator, stub_corpus, out, limit=1)
    with pytest.raises(ValueError, match="f1_threshold"):
        synthesize(generator, stub_corpus, out, SynthesisConfig(f1_threshold=0.8))
    users_file = tmp_path / "mine.jsonl"
    users_file.write_text('{"something": "a user saved"}\n')
    with pytest.raises(ValueError, match="not a synthesis run"):
        synthesize(generator, stub_corpus, users_file)
    assert users_file.read_text() == '{"something": "a user saved"}\n'


@pytest.mark.slow
def test_cli_run_killed_and_rerun_writes_every_row_once(stub_server, stub_corpus, tmp_path):
    _StubHandler.delay = 0.05  # slow enough to kill the run part-way
    out = tmp_path / "synthesized" / OUTPUT_FILE
    command = [sys.executable, "-m", "modeling_clara.cli", "synthesize", "--endpoint", stub_server, "--generator",
               "stub", "--corpus", str(stub_corpus), "--output-dir", str(out.parent), "--batch-size", "1",
               "--max-workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = progress_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and (not progress.exists() or progress.read_text().count("\n") < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished_before = progress.read_text().count("\n")
    assert 2 <= finished_before < len(STUB_CORPUS), "the kill did not land part-way"
    _StubHandler.delay = 0.0
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"| passages | {len(STUB_CORPUS)} |" in completed.stdout
    qa_rows = [r for r in _read_rows(out) if r["data_type"] == "qa"]
    assert [r["docs"][0] for r in qa_rows] == STUB_CORPUS  # each passage once, in corpus order
    reference = tmp_path / "reference.jsonl"
    synthesize(OpenAICompatibleGenerator(stub_server, "stub"), stub_corpus, reference, batch_size=1)
    assert out.read_bytes() == reference.read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Local generators


def test_local_generator_batches_like_single_prompts(tiny_llama_dir):
    generator = LocalGenerator(str(tiny_llama_dir), batch_size=3)
    prompts = ["short", "a much longer prompt that needs left padding in a batch", "mid length prompt"]
    batched = generator.generate(prompts, max_new_tokens=6)
    singles = [generator.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batched == singles


@pytest.mark.slow
@pytest.mark.integration
def test_embedded_generator_writes_valid_stage1_rows(tmp_path):
    example = json.loads((DATA_DIR / "hotpotqa_dev.jsonl").open().readline())
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": example["docs"][i]}) + "\n"
                              for i in example["pos_index"]))
    out = tmp_path / "pretrain.jsonl"
    config = SynthesisConfig(n_simple=2, n_complex=1, coverage_rounds=1, max_new_tokens=160)
    stats = synthesize(LocalGenerator("embedded", batch_size=8), corpus, out, config, batch_size=2)
    rows = _read_rows(out)
    assert stats["passages"] == len(example["pos_index"]) and stats["rows"] == len(rows) > 0
    assert stats["qa_kept"] + stats["qa_unverified"] + stats["qa_closed_book"] == stats["qa_candidates"]
    dataset = load_clara_jsonl(out, stage="pretrain")
    assert len(dataset) == len(rows)
    passages = {example["docs"][i] for i in example["pos_index"]}
    for row in rows:
        assert row["docs"][0] in passages
        for question, answer in zip(row["question"] if row["data_type"] == "qa" else [], row["answers"]):
            assert len(answer.split()) <= config.max_answer_words and question.strip()
