"""Stage-1 training data for CLaRa's salient compressor, synthesised from a corpus by an instruct LM.

For every passage the generator writes simple QA pairs (one fact each), complex QA pairs (several facts combined) and
a paraphrase. A QA pair is kept only if the generator, asked the question again with the passage, gives an answer
that agrees with the proposed one (token F1 of SQuAD-normalised answers at or above a threshold), and, with the
closed-book check on, only if it does *not* also answer it without the passage. Then a coverage loop asks for more
questions about the passage's sentences that no kept answer comes from, a bounded number of rounds.

Output rows are Apple's stage-1 format (`data_type`, `question`, `answers`, `docs`), ready for
`clara train --stage pretrain`. The run appends passage by passage and records each finished passage in
`<output>.progress.jsonl`; running the same command again continues after the last finished passage.

```bash
clara synthesize --corpus passages.jsonl --output-dir stage1_data           # embedded SmolLM2 generator
clara synthesize --generator Qwen/Qwen2.5-7B-Instruct --corpus passages.jsonl --output-dir stage1_data
clara synthesize --endpoint http://127.0.0.1:8000/v1 --generator served-name --corpus ... --output-dir ...  # e.g. vLLM
clara train --stage pretrain --model embedded --data stage1_data/pretrain.jsonl --output-dir runs/stage1
```
"""

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.utils import logging

from .backbone import EMBEDDED_BACKBONE, resolve_backbone_path
from .corpus import read_corpus
from .generation import generate_completions
from .jsonl import append_jsonl, read_for_resume, record_settings
from .metrics import normalize_answer, token_f1
from .processing_clara import check_positive

logger = logging.get_logger(__name__)

# Every prompt the pipeline sends, in one place. Placeholders: {passage}, {n}, {sentences}, {question}.
PROMPTS = {
    "simple_qa": (
        "Read the passage and write {n} questions. Each question asks about one fact stated in the passage and has "
        "a short answer copied from the passage.\n"
        "Write each pair on two lines, exactly like this:\nQ: <question>\nA: <answer>\n\nPassage:\n{passage}"
    ),
    "complex_qa": (
        "Read the passage and write {n} questions. Each question combines two or more facts from the passage, and "
        "its short answer is in the passage.\n"
        "Write each pair on two lines, exactly like this:\nQ: <question>\nA: <answer>\n\nPassage:\n{passage}"
    ),
    "more_qa": (
        "Read the passage. These sentences of it are not covered by any question yet:\n{sentences}\n\n"
        "Write {n} questions about facts in those sentences, each with a short answer copied from the passage.\n"
        "Write each pair on two lines, exactly like this:\nQ: <question>\nA: <answer>\n\nPassage:\n{passage}"
    ),
    "paraphrase": (
        "Rewrite the passage in your own words. Keep every fact: names, numbers, dates and places. "
        "Write only the rewritten passage.\n\nPassage:\n{passage}"
    ),
    "answer_with_passage": (
        "Answer the question using the passage. Reply with the answer only, in a few words.\n\n"
        "Passage:\n{passage}\n\nQuestion: {question}"
    ),
    "answer_closed_book": "Answer the question. Reply with the answer only, in a few words.\n\nQuestion: {question}",
}

_QA_LINE = re.compile(
    # optional bullet, number and bold; Q/A/Question/Answer with an optional index; the colon; the text
    r"^\s*(?:[-*]\s+)?(?:\d+[.)]\s*)?(?:\*\*)?(Q|A|Question|Answer)\s*\d*\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*(.*)$",
    re.I,
)
_PARAPHRASE_HEADER = re.compile(r"^\s*(here is|here's|rewritten passage|paraphrase)[^.!?]*:\s*$", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_WORDS = 4  # shorter pieces are titles or fragments, not facts to cover
# The rows' file in `clara synthesize --output-dir`: stage-1 data is what `clara train --stage pretrain` reads.
OUTPUT_FILE = "pretrain.jsonl"


@dataclass
class SynthesisConfig:
    """The knobs of a synthesis run; a resumed run must use the same ones (they are recorded next to the output).

    Args:
        n_simple (`int`): Simple (one-fact) QA pairs asked for per passage.
        n_complex (`int`): Complex (multi-fact) QA pairs asked for per passage.
        paraphrase (`bool`): Also write one paraphrase row per passage.
        f1_threshold (`float`): Keep a pair when the re-answer's token F1 against the proposed answer is at least this.
        closed_book_check (`bool`): Reject pairs the generator also answers (F1 >= threshold) without the passage.
        coverage_rounds (`int`): At most this many rounds asking for questions about uncovered sentences.
        n_more (`int`): QA pairs asked for per coverage round.
        min_paraphrase_ratio (`float`): A paraphrase shorter than this share of the passage's words is rejected.
        max_paraphrase_f1 (`float`): A paraphrase whose token F1 against the passage is above this is a copy, rejected.
        max_question_words (`int`), max_answer_words (`int`): Longer questions or answers are not QA pairs (a small
            generator sometimes repeats the passage); they are rejected as `qa_too_long`.
        max_new_tokens (`int`): Tokens per generated QA list or paraphrase.
        answer_max_new_tokens (`int`): Tokens per verification answer.
        temperature (`float`): 0 is greedy (deterministic); above 0 samples, seeded per batch.
        seed (`int`): Seed of the run.
    """

    n_simple: int = 3
    n_complex: int = 2
    paraphrase: bool = True
    f1_threshold: float = 0.5
    closed_book_check: bool = True
    coverage_rounds: int = 1
    n_more: int = 2
    min_paraphrase_ratio: float = 0.5
    max_paraphrase_f1: float = 0.9
    max_question_words: int = 60
    max_answer_words: int = 30
    max_new_tokens: int = 256
    answer_max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("n_simple", "n_complex", "coverage_rounds", "n_more"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-negative int")
        for name in ("max_new_tokens", "answer_max_new_tokens", "max_question_words", "max_answer_words"):
            check_positive(name, getattr(self, name))
        for name in ("f1_threshold", "min_paraphrase_ratio", "max_paraphrase_f1"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0")
        if self.n_simple + self.n_complex + self.n_more * self.coverage_rounds == 0 and not self.paraphrase:
            raise ValueError("nothing to generate: every count is 0 and paraphrase is off")


# ----------------------------------------------------------------------------------------------------------------
# Parsing generator output


def parse_qa_pairs(text: str) -> tuple[list[tuple[str, str]], int]:
    """`Q: ... / A: ...` pairs in a generation, and how many malformed pieces were skipped.

    Malformed: an answer without a question, a question without an answer, or an empty side. Numbering, bold
    markers and `Question:`/`Answer:` spellings are accepted; a line right below a field continues it.
    """
    pairs, malformed = [], 0
    question = answer = None
    field = None

    def close_pair():
        nonlocal malformed
        if question is None and answer is None:
            return
        if question and answer:
            pairs.append((question.strip(), answer.strip()))
        else:
            malformed += 1

    for line in text.splitlines():
        match = _QA_LINE.match(line)
        if match is None:
            if not line.strip():
                field = None  # a blank line ends the field: what follows is not part of it
            elif field == "q":
                question += " " + line.strip()
            elif field == "a":
                answer += " " + line.strip()
            continue
        if match.group(1)[0].lower() == "q":
            close_pair()
            question, answer, field = match.group(2).strip(), None, "q"
        elif question is not None and answer is None:
            answer, field = match.group(2).strip(), "a"
        else:  # an answer with no open question: skipped, and it ends the pair before it
            close_pair()
            malformed += 1
            question, answer, field = None, None, None
    close_pair()
    return pairs, malformed


def parse_paraphrase(text: str, passage: str, min_ratio: float, max_f1: float) -> str | None:
    """The paraphrase, or None when it is empty, (nearly) a copy of the passage, or much shorter than it."""
    # Chatty header lines ("Here is the rewritten passage:") are not content.
    paraphrase = "\n".join(line for line in text.strip().splitlines() if not _PARAPHRASE_HEADER.match(line)).strip()
    if not paraphrase or token_f1(paraphrase, passage) > max_f1:
        return None
    if len(paraphrase.split()) < min_ratio * len(passage.split()):
        return None
    return paraphrase


# ----------------------------------------------------------------------------------------------------------------
# Verification and coverage


def verification_decision(answer: str, answer_with_passage: str, answer_closed_book: str | None,
                          threshold: float) -> str:
    """`"kept"`, `"unverified"` (re-answer from the passage disagrees) or `"closed_book"` (answerable without it)."""
    if token_f1(answer_with_passage, answer) < threshold:
        return "unverified"
    if answer_closed_book is not None and token_f1(answer_closed_book, answer) >= threshold:
        return "closed_book"
    return "kept"


def passage_sentences(passage: str) -> list[str]:
    """The passage's sentences that state something (at least `MIN_SENTENCE_WORDS` words)."""
    pieces = (s.strip() for line in passage.splitlines() for s in _SENTENCE_END.split(line))
    return [s for s in pieces if len(s.split()) >= MIN_SENTENCE_WORDS]


def uncovered_sentences(passage: str, answers: list[str]) -> list[str]:
    """Sentences that contain none of the kept answers (all of an answer's normalised words in the sentence)."""
    answer_words = [set(normalize_answer(a).split()) for a in answers]
    uncovered = []
    for sentence in passage_sentences(passage):
        words = set(normalize_answer(sentence).split())
        if not any(a and a <= words for a in answer_words):
            uncovered.append(sentence)
    return uncovered


# ----------------------------------------------------------------------------------------------------------------
# Generators: a list of user messages in, one reply each out


class LocalGenerator:
    """Any Hugging Face causal LM with a chat template (`"embedded"`: the packaged SmolLM2-135M-Instruct).

    Prompts are generated in batches of `batch_size` with left padding, on the GPU when there is one.
    """

    def __init__(self, name_or_path: str = EMBEDDED_BACKBONE, batch_size: int = 8, device: str | None = None,
                 dtype="auto"):
        check_positive("batch_size", batch_size)
        path = resolve_backbone_path(name_or_path)
        self.name = name_or_path
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.chat_template is None:
            raise ValueError(f"generator {name_or_path!r} has no chat template; synthesis needs an instruct model")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        replies = []
        for start in range(0, len(prompts), self.batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[start : start + self.batch_size]]
            texts = self.tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
            replies += generate_completions(self.model, self.tokenizer, texts, max_new_tokens, **sampling)
        return replies


class OpenAICompatibleGenerator:
    """A chat-completions HTTP endpoint (vLLM, TGI, llama.cpp server, OpenAI...) for generators too large to load.

    Requests run `max_workers` at a time, so the server can batch them. The key comes from `api_key` or the
    `OPENAI_API_KEY` environment variable; a local server usually needs none.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_workers: int = 8,
                 timeout: float = 300.0, seed: int = 0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint={base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = model
        self.max_workers = max_workers
        self.timeout = timeout
        self.seed = seed
        self.session = requests.Session()
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def _complete(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        body = {"model": self.name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens,
                "temperature": temperature, "seed": self.seed}
        response = self.session.post(self.url, json=body, timeout=self.timeout)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return (response.json()["choices"][0]["message"]["content"] or "").strip()
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.url} sent no chat completion: {response.text[:300]}") from None

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda p: self._complete(p, max_new_tokens, temperature), prompts))


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


class PassageWork:
    """What is known about one passage while its batch is processed: candidates, kept pairs, paraphrase, stats."""

    def __init__(self, passage_id: str, passage: str):
        self.id = passage_id
        self.passage = passage
        self.kept: list[tuple[str, str]] = []
        self.asked: set[str] = set()  # normalised questions proposed so far, kept or not
        self.paraphrase: str | None = None
        self.stats: Counter = Counter()

    def add_candidates(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The pairs whose question is new for this passage (repeats are counted as duplicates)."""
        fresh = []
        for question, answer in pairs:
            key = normalize_answer(question)
            if key in self.asked:
                self.stats["qa_duplicate"] += 1
            else:
                self.asked.add(key)
                fresh.append((question, answer))
        self.stats["qa_candidates"] += len(fresh)
        return fresh

    def rows(self) -> list[dict]:
        """Apple's stage-1 rows for this passage: one `qa` row with every kept pair, one `paraphrase` row."""
        rows = []
        if self.kept:
            rows.append({"data_type": "qa", "question": [q for q, _ in self.kept],
                         "answers": [a for _, a in self.kept], "docs": [self.passage]})
        if self.paraphrase is not None:
            rows.append({"data_type": "paraphrase", "question": "", "answers": [self.paraphrase],
                         "docs": [self.passage]})
        return rows


class Synthesizer:
    """Runs the pipeline over passages with one generator (`LocalGenerator` or `OpenAICompatibleGenerator`)."""

    def __init__(self, generator, config: SynthesisConfig | None = None):
        self.generator = generator
        self.config = config or SynthesisConfig()

    def _generate(self, prompts: list[str], max_new_tokens: int, stats: Counter) -> list[str]:
        stats["generations"] += len(prompts)
        return self.generator.generate(prompts, max_new_tokens, self.config.temperature) if prompts else []

    def process(self, works: list[PassageWork], stats: Counter) -> None:
        """Fill `kept` and `paraphrase` of every passage in the batch; counts go to each work's stats."""
        config = self.config
        asks = []  # (work, prompt kind, pairs asked for) in the order of the prompts
        for work in works:
            if config.n_simple:
                asks.append((work, "simple_qa", config.n_simple))
            if config.n_complex:
                asks.append((work, "complex_qa", config.n_complex))
            if config.paraphrase:
                asks.append((work, "paraphrase", None))
        prompts = [PROMPTS[kind].format(passage=w.passage, n=n) for w, kind, n in asks]
        replies = self._generate(prompts, config.max_new_tokens, stats)
        checks = []
        for (work, kind, _), reply in zip(asks, replies):
            if kind == "paraphrase":
                work.paraphrase = parse_paraphrase(
                    reply, work.passage, config.min_paraphrase_ratio, config.max_paraphrase_f1
                )
                work.stats["paraphrase_kept" if work.paraphrase is not None else "paraphrase_rejected"] += 1
            else:
                checks += [(work, q, a) for q, a in self._parse(work, reply)]
        self._verify(checks, stats)
        for _ in range(config.coverage_rounds):
            if not self._coverage_round(works, stats):
                break

    def _parse(self, work: PassageWork, reply: str) -> list[tuple[str, str]]:
        pairs, malformed = parse_qa_pairs(reply)
        work.stats["qa_malformed"] += malformed
        if not pairs:
            work.stats["outputs_without_pairs"] += 1
        short = [(q, a) for q, a in pairs
                 if len(q.split()) <= self.config.max_question_words and len(a.split()) <= self.config.max_answer_words]
        work.stats["qa_too_long"] += len(pairs) - len(short)
        return work.add_candidates(short)

    def _coverage_round(self, works: list[PassageWork], stats: Counter) -> bool:
        """Ask for questions about uncovered sentences; False when every passage is covered (nothing asked)."""
        asked = []
        for work in works:
            uncovered = uncovered_sentences(work.passage, [a for _, a in work.kept])
            if uncovered and self.config.n_more:
                asked.append((work, "\n".join(f"- {s}" for s in uncovered)))
        if not asked:
            return False
        prompts = [PROMPTS["more_qa"].format(passage=w.passage, n=self.config.n_more, sentences=s) for w, s in asked]
        replies = self._generate(prompts, self.config.max_new_tokens, stats)
        checks = []
        for (work, _), reply in zip(asked, replies):
            work.stats["coverage_rounds"] += 1
            checks += [(work, q, a) for q, a in self._parse(work, reply)]
        self._verify(checks, stats)
        return True

    def _verify(self, checks: list[tuple[PassageWork, str, str]], stats: Counter) -> None:
        """Re-answer every (passage, question, answer) from the passage, then closed book; keep what passes."""
        if not checks:
            return
        answer_tokens = self.config.answer_max_new_tokens
        with_passage = self._generate(
            [PROMPTS["answer_with_passage"].format(passage=w.passage, question=q) for w, q, _ in checks],
            answer_tokens, stats,
        )
        closed_book = [None] * len(checks)
        if self.config.closed_book_check:
            # Only pairs that passed the passage check need the closed-book one.
            passed = [i for i, (r, (_, _, a)) in enumerate(zip(with_passage, checks))
                      if token_f1(r, a) >= self.config.f1_threshold]
            replies = self._generate(
                [PROMPTS["answer_closed_book"].format(question=checks[i][1]) for i in passed], answer_tokens, stats
            )
            for i, reply in zip(passed, replies):
                closed_book[i] = reply
        for (work, question, answer), reply, closed in zip(checks, with_passage, closed_book):
            decision = verification_decision(answer, reply, closed, self.config.f1_threshold)
            work.stats[f"qa_{decision}"] += 1
            if decision == "kept":
                work.kept.append((question, answer))


# ----------------------------------------------------------------------------------------------------------------
# Resumable output


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def config_path(out: Path) -> Path:
    return out.with_name(out.name + ".config.json")


def run_settings(generator_name: str, corpus: str, config: SynthesisConfig) -> dict:
    """What a resumed run must share with the first one: generator, corpus, knobs and the prompts' hash."""
    prompts_sha = hashlib.sha256(json.dumps(PROMPTS, sort_keys=True).encode()).hexdigest()
    return {"generator": generator_name, "corpus": os.path.abspath(corpus), "prompts_sha256": prompts_sha,
            **dataclasses.asdict(config)}


def restore_progress(out: Path, settings: dict) -> tuple[set[str], Counter]:
    """Finished passage ids and their stats; the output is cut back to the end of the last finished passage.

    Rows of a passage the previous run was killed in are removed, so they are written once, when it is redone.
    A progress line cut by the kill is dropped (its passage is redone).
    """
    recorded = config_path(out)
    if not recorded.exists() and out.exists() and out.stat().st_size:
        raise ValueError(
            f"{out} exists but has no {recorded.name}: not a synthesis run to resume; choose another --output-dir"
        )
    record_settings(recorded, settings, conflict=f"{out} was written with other settings",
                    advice="use another --output-dir or the same settings to resume")
    done, stats, end = set(), Counter(), 0
    for record in read_for_resume(progress_path(out)):
        done.add(record["id"])
        stats.update(record["stats"])
        end = record["end"]
    if out.exists() and out.stat().st_size > end:
        os.truncate(out, end)
    return done, stats


def append_passage(out, progress, work: PassageWork) -> None:
    """Rows first, then the progress line that marks the passage finished (with the output's size after its rows)."""
    end = append_jsonl(out, work.rows())
    append_jsonl(progress, [{"id": work.id, "end": end, "stats": dict(work.stats)}])


def synthesize(generator, corpus, out: str | os.PathLike, config: SynthesisConfig | None = None,
               batch_size: int = 4, limit: int | None = None) -> Counter:
    """Synthesise stage-1 rows for every passage of `corpus` into `out`, resuming a previous run of the same command.

    Args:
        generator: A `LocalGenerator`, an `OpenAICompatibleGenerator`, or anything with `name` and
            `generate(prompts, max_new_tokens, temperature) -> list[str]`.
        corpus: A JSONL path (`text`, optional `id`), `"shipped"`, a list of passages or a `datasets.Dataset` (see
            `read_corpus`).
        out: The output JSONL; `<out>.progress.jsonl` and `<out>.config.json` are written beside it.
        config (`SynthesisConfig`, *optional*): The run's knobs.
        batch_size (`int`): Passages processed together (their prompts go to the generator as one list).
        limit (`int`, *optional*): Only the first `limit` passages of the corpus.
    Returns:
        `Counter` of the whole run (resumed parts included): passages, rows, generations, and per check the
        kept and rejected counts.
    """
    config = config or SynthesisConfig()
    check_positive("batch_size", batch_size)
    if limit is not None:
        check_positive("limit", limit)
    documents = read_corpus(corpus)
    if limit is not None:
        documents = documents.select(range(min(limit, len(documents))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus_name = corpus if isinstance(corpus, (str, os.PathLike)) else "<in memory>"
    settings = run_settings(generator.name, os.fspath(corpus_name), config)
    done, stats = restore_progress(out, settings)
    todo = [(i, d["id"], d["text"]) for i, d in enumerate(documents) if d["id"] not in done]
    if done:
        logger.info(f"Resuming {out}: {len(done)} passages done, {len(todo)} to go")
    synthesizer = Synthesizer(generator, config)
    # Binary append: `append_jsonl` returns byte offsets, which a resumed run truncates the output to.
    with out.open("ab") as out_file, progress_path(out).open("ab") as progress:
        for start in tqdm(range(0, len(todo), batch_size), desc="Synthesising", unit="batch"):
            batch = todo[start : start + batch_size]
            # Seeded by the batch's first passage so that sampling repeats when a run is redone from there.
            set_seed(config.seed + batch[0][0])
            works = [PassageWork(passage_id, text) for _, passage_id, text in batch]
            generation_stats = Counter()
            synthesizer.process(works, generation_stats)
            # Generator calls serve the whole batch; they are booked on its first passage so the progress file
            # (per passage) still adds up to the run's total.
            works[0].stats.update(generation_stats)
            for work in works:
                work.stats["passages"] += 1
                work.stats["rows"] += len(work.rows())
                work.stats["passages_without_rows"] += not work.rows()
                append_passage(out_file, progress, work)
                stats.update(work.stats)
    return stats


STATS_ORDER = (
    "passages", "rows", "passages_without_rows", "generations", "outputs_without_pairs", "qa_malformed",
    "qa_too_long", "qa_duplicate", "qa_candidates", "qa_kept", "qa_unverified", "qa_closed_book", "coverage_rounds",
    "paraphrase_kept", "paraphrase_rejected",
)


def stats_table(stats: Counter) -> str:
    """The run's counts as a markdown table (kept / rejected per check)."""
    lines = ["| count | value |", "|---|---|"]
    lines += [f"| {key} | {stats.get(key, 0)} |" for key in STATS_ORDER]
    return "\n".join(lines) + "\n"
