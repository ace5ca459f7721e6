"""Integration: the CLaRa shipped in modeling_clara/shipped loads offline, answers from passages it compresses better
than the same architecture untrained and retrieves the gold passage with its query reasoner. It reads its memory: a
wrong passage's memory costs at least 0.10 F1 on bundled questions it never trained on."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, QUICKSTART
from transformers import AutoModel

from modeling_clara import ClaraForRAG
from modeling_clara.metrics.clara_qa.clara_qa import score_example
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE, SHIPPED_MODEL_DIR
from modeling_clara.index import open_or_build_index

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_DOCUMENTS = 20  # bundled passages asked about, two questions each


@pytest.fixture(scope="module")
def shipped(embedded_backbone_dir):
    return ClaraForRAG.from_pretrained("shipped")


@pytest.fixture(scope="module")
def untrained(embedded_backbone_dir, shipped):
    torch.manual_seed(0)
    config = {key: getattr(shipped.config, key) for key in ("compr_rate", "doc_max_length", "training_stage")}
    return ClaraForRAG.from_backbone("embedded", **config)


def scp_qa_pairs() -> dict[str, list[tuple[str, str]]]:
    """Each passage of Apple's SCP sample with its (question, answer) pairs."""
    qa = {}
    for line in open(DATA_DIR / "clara_pretrain_sample.jsonl", encoding="utf-8"):
        row = json.loads(line)
        qa[row["docs"][0]] = list(zip(row["question"], row["answers"]))
    return qa


@pytest.fixture(scope="module")
def bundled_questions() -> list[tuple[str, str, str]]:
    """(passage, question, answer) for bundled passages, from the QA pairs Apple's SCP sample holds for them.

    The bundled corpus is the shipped model's held-out split: these questions were never trained on."""
    corpus = [json.loads(line)["text"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")][:N_DOCUMENTS]
    qa = scp_qa_pairs()
    return [(passage, q, a) for passage in corpus for q, a in qa[passage][:2]]


def compressed(model: ClaraForRAG, passages: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct passage's memory, `(n_mem, hidden)`, compressed once (two questions share each passage)."""
    distinct = list(dict.fromkeys(passages))
    return dict(zip(distinct, model.compress(distinct)))


def answer_f1s(model: ClaraForRAG, questions: list[tuple[str, str, str]], passages: list[str] | None = None,
               memory: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Token F1 of each answer, reading the question's own passage or, given `passages`, that passage instead.

    `memory`: the passages' memories from [`compressed`] (default: compressed here)."""
    passages = passages or [passage for passage, _, _ in questions]
    memory = memory or compressed(model, passages)
    answers = model.answer([q for _, q, _ in questions], [memory[p].unsqueeze(0) for p in passages], max_new_tokens=24)
    return [score_example(prediction, [gold])["f1"] for prediction, (_, _, gold) in zip(answers, questions)]


@pytest.fixture(scope="module")
def bundled_documents(bundled_questions) -> list[str]:
    return list(dict.fromkeys(passage for passage, _, _ in bundled_questions))


@pytest.fixture(scope="module")
def shipped_memory(shipped, bundled_documents) -> dict[str, torch.Tensor]:
    return compressed(shipped, bundled_documents)


@pytest.fixture(scope="module")
def shipped_f1s(shipped, shipped_memory, bundled_questions) -> list[float]:
    """The shipped model's F1 on each bundled question, reading the question's own passage."""
    return answer_f1s(shipped, bundled_questions, memory=shipped_memory)


def test_shipped_model_is_small_and_in_the_package_format(shipped):
    weights = sum(p.stat().st_size for p in Path(SHIPPED_MODEL_DIR).glob("*.safetensors"))
    assert weights < 32 * 2**20
    assert shipped.has_query_reasoner and shipped.config.decoder_model_name == "embedded"


def test_auto_model_loads_the_shipped_folder_without_code_copies(shipped):
    assert not list(Path(SHIPPED_MODEL_DIR).glob("*.py"))  # the package is its code: nothing to drift
    loaded = AutoModel.from_pretrained(SHIPPED_MODEL_DIR)
    assert isinstance(loaded, ClaraForRAG)
    for (name, ours), theirs in zip(shipped.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_shipped_answers_what_the_untrained_model_gets_wrong(shipped_f1s, untrained, bundled_questions):
    trained_f1, untrained_f1 = shipped_f1s, answer_f1s(untrained, bundled_questions)
    fixed = [i for i, (t, u) in enumerate(zip(trained_f1, untrained_f1)) if t >= 0.5 and u < 0.5]
    assert len(fixed) >= 3, (trained_f1, untrained_f1)
    assert sum(trained_f1) > 3 * max(sum(untrained_f1), 0.1)


def test_shipped_query_reasoner_finds_passages_in_the_bundled_index(shipped, bundled_questions, demo_run):
    """Over the whole bundled corpus (100 passages, chance 1%), the gold passage comes first for at least half of the
    questions and among the first 10 for nine in ten. The index is the one the demo built (reused, as the demo's
    second run would: the same compressor and corpus)."""
    index = open_or_build_index(shipped, SHIPPED_CORPUS_FILE, demo_run.index_dir)
    assert len(index) == 100
    results = index.search([q for _, q, _ in bundled_questions], k=10)
    first = [result.texts[0] == passage for (passage, _, _), result in zip(bundled_questions, results)]
    found = [passage in result.texts for (passage, _, _), result in zip(bundled_questions, results)]
    assert sum(first) / len(first) >= 0.5, first
    assert sum(found) / len(found) >= 0.9, found


def wrong_passages(questions: list[tuple[str, str, str]]) -> list[str]:
    """For each question a bundled passage that is not its own: the next document's."""
    documents = list(dict.fromkeys(passage for passage, _, _ in questions))
    return [documents[(documents.index(passage) + 1) % len(documents)] for passage, _, _ in questions]


def test_shipped_answers_from_its_memory(shipped, shipped_memory, shipped_f1s, bundled_questions):
    """Grounding: the same questions answered reading their own passage and reading another one."""
    gold = shipped_f1s
    wrong = answer_f1s(shipped, bundled_questions, wrong_passages(bundled_questions), memory=shipped_memory)
    mean_gold, mean_wrong = sum(gold) / len(gold), sum(wrong) / len(wrong)
    assert mean_gold - mean_wrong >= 0.10, (mean_gold, mean_wrong)


def test_shipped_query_reasoner_ranks_the_gold_passage_first(shipped, shipped_memory, bundled_documents,
                                                              bundled_questions):
    """Among 4 candidates (the gold passage and the next three bundled ones), the gold one comes first for at least
    half of the questions (chance: a quarter)."""
    documents = bundled_documents
    memory = torch.stack([shipped_memory[document] for document in documents])
    firsts = []
    for passage, question, _ in bundled_questions:
        i = documents.index(passage)
        candidates = [(i + offset) % len(documents) for offset in range(4)]  # gold first in the list, ranked below
        _, ranked = shipped.retrieve(question, memory[candidates], k=4)
        firsts.append(ranked[0].item() == 0)
    assert sum(firsts) / len(firsts) >= 0.5, firsts


def demo_questions() -> list[str]:
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    return quickstart.QUESTIONS


def demo_answers(stdout: str) -> dict[str, tuple[str, str]]:
    """The demo's {question: (id of the passage retrieved first, answer)}, read from its output."""
    shown, question, first = {}, None, None
    for line in stdout.splitlines():
        if line.startswith("Q: "):
            question, first = line[3:], None
        elif line.startswith("  [1] "):
            first = line.split()[1]
        elif line.startswith("A: "):
            shown[question] = (first, line[3:])
    return shown


def test_demo_answers_its_questions_from_the_retrieved_passage(shipped, demo_run):
    """For each question of `make demo` (held-out SCP questions about bundled passages) the gold passage is retrieved
    first and the answer matches the gold answer (F1 >= 0.5); reading another passage's memory instead, it does not:
    the answer comes from the passage's memory, not from the generator's prior."""
    corpus = [json.loads(line) for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]
    qa = scp_qa_pairs()
    gold = {  # question -> (position of its passage in the corpus, answer)
        q: (i, a) for i, document in enumerate(corpus) for q, a in qa.get(document["text"], [])
    }
    questions = demo_questions()
    assert questions and all(question in gold for question in questions), questions

    shown = demo_answers(demo_run.stdout)
    assert sorted(shown) == sorted(questions), shown
    for question in questions:
        passage, answer = gold[question]
        retrieved_first, demo_answer = shown[question]
        assert retrieved_first == corpus[passage]["id"], (question, shown[question])
        assert score_example(demo_answer, [answer])["f1"] >= 0.5, (question, demo_answer, answer)
    # The control: each question reads the next bundled passage's memory instead of its own.
    others = shipped.compress([corpus[(gold[q][0] + 1) % len(corpus)]["text"] for q in questions])
    from_others = shipped.answer(questions, list(others.unsqueeze(1)), max_new_tokens=32)
    for question, from_other in zip(questions, from_others):
        answer = gold[question][1]
        assert score_example(from_other, [answer])["f1"] < 0.5, (question, from_other, answer)


# A tqdm progress bar's update ends with its elapsed time and rate in brackets: "[00:12<00:03,  2.01s/it]".
PROGRESS_BAR_END = re.compile(r"\[\d+:\d\d[^\]]*\]\s*$")


def test_demo_prints_no_warning(demo_run):
    """The demo's stderr holds progress bars and the package's info lines (on a first run, the index it builds and
    where it keeps it); any other line (a Python warning, a record of transformers or of the package at warning
    level) fails."""
    lines = [line for line in demo_run.stderr.splitlines() if line.strip()]  # splitlines splits a bar's "\r" too
    unexpected = [line for line in lines if not (line.startswith("[clara INFO] ") or PROGRESS_BAR_END.search(line))]
    assert not unexpected, "\n".join(unexpected)
    assert any(line.startswith("[clara INFO] first run: building the index") for line in lines), lines
