"""`clara eval` and `clara eval-retrieval`: answer quality and Recall@k of CLaRa and its baselines on one backbone.

Data is CLaRa's end-to-end JSONL, one question per line: `question`, `docs` (its candidate passages), `pos_index`
(the gold candidates), `gold_answer`, `answers` (all accepted answers). `--data` takes files or folders (a folder
contributes every `*.jsonl` in this format; training files such as the SCP sample are skipped).

Methods (`--method`), all on the same backbone:
  clara            CLaRa reads k compressed candidates, ranked by its query reasoner (a model without one reads
                   them in the given order).
  clara_wrong_memory  the control for grounding: CLaRa reads k compressed candidates that are not gold (the first
                   non-gold ones in the given order). Its gap to `clara` is what reading the memory is worth.
  closed_book      the plain backbone (adapters off), no documents: CLaRa's answer prompt without a Background.
  text_rag_bm25    the plain backbone reads the top-k candidates by BM25 as text in the Background.
  text_rag_minilm  the same, ranked by MiniLM (all-MiniLM-L6-v2).
  text_oracle      the plain backbone reads the Oracle set (every gold passage, then the given order) as text.
  text_rag_clara   the plain backbone reads CLaRa's top-k (ranked by its query reasoner) as text: the passages
                   CLaRa reads as memory.
  text_reader      the same passages read as text by a fine-tuned text reader (`--text-reader DIR`, trained on
                   CLaRa's stage-2 rows by `python -m modeling_clara.text_reader`): CLaRa against a reader that
                   learned the same answer format.

Settings (`--setting`): `normal` reads the first k of the method's ranking; `oracle` reads every gold passage
plus the best-ranked others up to k, in ranking order. `closed_book` and `text_oracle` ignore the setting.

Scores: EM, F1 and Cover-EM under Apple's protocol (first gold answer only: `apple_*`) and the maximum over all
accepted answers (`em`, `f1`, `cover_em`); Recall@1/3/5 of the ranking used and `gold_read`, the share of gold
passages among the k read. Predictions go to `<output-dir>/<data stem>/<run>.jsonl`, appended and flushed per
batch: rerunning a command skips the examples already there (a run with other settings in the same file is an
error). Each run also writes `<run>.summary.json` and `.summary.md`; `<output-dir>/summary.md` collects them all,
and `<output-dir>/differences.md` gives CLaRa minus each text method (same file and k) with paired bootstrap
intervals over the questions both answered. A method ranked by CLaRa reads the rankings that earlier runs in the same
folder recorded for the same model, weights and file (ranking compresses every candidate), so methods evaluated in
separate commands read the same passages and only the first pays for ranking.
"""

import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .backbone import EMBEDDED_BACKBONE
from .data import check_e2e_candidates
from .fingerprint import adapter_weights, weights_sha256
from .generation import generate_completions
from .jsonl import append_jsonl, read_complete_records, read_for_resume, read_jsonl, record_settings, write_text_atomic
from .metrics import recall_at_k, score_example
from .modeling_clara import ClaraForRAG
from .processing_clara import SYSTEM_PROMPT_ANSWER, check_positive
from .text_reader import text_user_turn, truncate_passage
from .text_retrieval import load_text_retriever, oracle_candidates

logger = logging.get_logger(__name__)

METHODS = ("clara", "clara_wrong_memory", "closed_book", "text_rag_bm25", "text_rag_minilm", "text_oracle",
           "text_rag_clara", "text_reader")
SETTINGS = ("normal", "oracle")
RANKERS = ("clara", "bm25", "minilm", "given_order")
CONTROL_RANKERS = ("non_gold",)  # clara_wrong_memory's: not a retriever, so not in `clara eval-retrieval`
RECALL_KS = (1, 3, 5)
METRIC_KEYS = ("apple_em", "apple_f1", "apple_cover_em", "em", "f1", "cover_em")
RANKING_KEYS = tuple(f"recall@{k}" for k in RECALL_KS) + ("gold_read",)
# Apple's stage-2 evaluation generates 64 tokens (evaluation/evaluate.py, `_process_stage2`).
DEFAULT_MAX_NEW_TOKENS = 64
# Compressed documents kept in memory between settings and methods of one run (FIFO beyond this).
COMPRESSION_CACHE_SIZE = 4096
# What CLaRa's ranking of a file's candidates depends on: runs that agree on these rank alike, whatever they read.
RANKING_FIELDS = ("ranking", "backbone", "doc_max_length", "model", "compr_rate", "adapters", "adapter_digest", "data")


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class EvalExample:
    id: str
    question: str
    docs: list[str]
    pos_index: list[int]
    answers: list[str]


def load_eval_data(path: str | os.PathLike, limit: int | None = None) -> list[EvalExample]:
    """Read and validate an end-to-end JSONL file (the first `limit` examples).

    Raises:
        `ValueError` naming the file and line of the first malformed row, or a repeated `id` (resuming a run
        matches examples by id).
    """
    examples, seen = [], {}
    for line_number, record in read_jsonl(path, limit):
        example = _parse_row(record, f"{path}:{line_number}", line_number)
        if example.id in seen:
            raise ValueError(f"{path}:{line_number}: id {example.id!r} repeats line {seen[example.id]}")
        seen[example.id] = line_number
        examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _parse_row(row: dict, where: str, line_number: int) -> EvalExample:
    candidates = check_e2e_candidates(row, where)
    gold, answers = row.get("gold_answer"), row.get("answers")
    if answers is None:
        answers = [gold] if gold is not None else []
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{where}: `answers` must be a non-empty list of non-empty str, got {answers!r:.80}")
    if gold is not None:
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"{where}: `gold_answer` must be a non-empty str, got {gold!r:.80}")
        answers = [gold] + [a for a in answers if a != gold]  # Apple's protocol scores against the first
    example_id = row.get("id", f"line-{line_number}")
    if not isinstance(example_id, (str, int)) or isinstance(example_id, bool):
        raise ValueError(f"{where}: `id` must be a str or int, got {example_id!r:.80}")
    return EvalExample(str(example_id), candidates["question"], candidates["docs"], candidates["pos_index"], answers)


def is_eval_file(path: str | os.PathLike) -> bool:
    """Whether the first row of a JSONL file looks like end-to-end evaluation data (str question, list of docs)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("docs"), list)
    return False


def expand_data_paths(paths: list[str]) -> list[Path]:
    """Files as given; folders give their `*.jsonl` files in the evaluation format (others are skipped, logged)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            for candidate in sorted(path.glob("*.jsonl")):
                if is_eval_file(candidate):
                    files.append(candidate)
                else:
                    logger.info(f"skipping {candidate}: not end-to-end evaluation data")
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such data file or folder: {path}")
    if not files:
        raise ValueError(f"no evaluation files in {paths}")
    return files


# ----------------------------------------------------------------------------------------------------------------
# Selecting and reading documents


def select_documents(ranking: list[int], pos_index: list[int], setting: str, k: int) -> list[int]:
    """The candidates read, in ranking order.

    Normal: the first k of the ranking. Oracle: `oracle_candidates` (every gold passage, the k best-ranked if
    there are more; then the best-ranked others), so gold passages are always read but keep their rank position.
    """
    if setting == "normal":
        return list(ranking[:k])
    if setting == "oracle":
        position = {index: rank for rank, index in enumerate(ranking)}
        chosen = oracle_candidates(len(ranking), pos_index, ranking, k)
        return sorted(chosen, key=lambda i: position.get(i, len(ranking)))
    raise ValueError(f"setting={setting!r} is not one of {SETTINGS}")


def text_prompt(model: ClaraForRAG, question: str, passages: list[str]) -> str:
    """CLaRa's answer prompt with the passages as text (one per line) in place of the memory-token slots.

    No passages: closed book, the same system prompt and `Question:{question}` alone. The chat template (and its
    system-role fallback) is the model's own, as for CLaRa's prompts.
    """
    return model.processor.apply_chat_template(SYSTEM_PROMPT_ANSWER, text_user_turn(question, passages))[0]


def generate_text(model: ClaraForRAG, prompts: list[str], max_new_tokens: int, **generate_kwargs) -> list[str]:
    """Greedy answers of the bare backbone to text prompts ([`ClaraForRAG.generate_with_backbone`])."""
    return model.generate_with_backbone(prompts, max_new_tokens, **generate_kwargs)


def count_tokens(tokenizer, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


class CompressedDocuments:
    """`model.compress` with a cache by text, so settings and methods of one run compress each passage once."""

    def __init__(self, model: ClaraForRAG, batch_size: int = 16, max_size: int = COMPRESSION_CACHE_SIZE):
        self.model, self.batch_size, self.max_size = model, batch_size, max_size
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, docs: list[str]) -> torch.Tensor:
        """`(len(docs), n_mem, hidden)`."""
        missing = [d for d in dict.fromkeys(docs) if d not in self._cache]
        if missing:
            embeds = self.model.compress(missing, batch_size=self.batch_size, show_progress_bar=False)
            self._cache.update(zip(missing, embeds))
            for stale in list(self._cache)[: max(0, len(self._cache) - max(self.max_size, len(docs)))]:
                del self._cache[stale]
        return torch.stack([self._cache[d] for d in docs])


class Ranker:
    """Orders each question's candidates: `rank(batch) -> (rankings, scores or None)`, scores aligned with rankings."""

    def __init__(self, name: str, model: ClaraForRAG | None = None, compressed: CompressedDocuments | None = None):
        if name not in RANKERS + CONTROL_RANKERS:
            raise ValueError(f"unknown ranker {name!r}; choose from {RANKERS + CONTROL_RANKERS}")
        if name == "clara" and (model is None or not model.has_query_reasoner):
            adapters = None if model is None else model.adapter_names
            raise ValueError(f"ranking by CLaRa needs a model with a query reasoner (this one has {adapters})")
        self.name, self.model = name, model
        self.compressed = compressed or (CompressedDocuments(model) if name == "clara" else None)
        self.text_retriever = load_text_retriever(name) if name in ("bm25", "minilm") else None

    def rank(
        self, batch: list[EvalExample], recorded: dict[str, dict] | None = None
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`recorded`: rankings an earlier run of the same ranking recorded ([`recorded_rankings`]), by example id;
        CLaRa ranks only the examples without one."""
        if self.name == "given_order":
            return [list(range(len(ex.docs))) for ex in batch], None
        if self.name == "non_gold":
            return [_non_gold_candidates(ex) for ex in batch], None
        if self.text_retriever is not None:
            return self.text_retriever.rank_batch([ex.question for ex in batch], [ex.docs for ex in batch]), None
        recorded = recorded or {}
        todo = [ex for ex in batch if ex.id not in recorded]
        ranked = {}
        if todo:
            candidates = [self.compressed(ex.docs) for ex in todo]
            scores, indices = self.model.retrieve(
                [ex.question for ex in todo], candidates, k=max(len(ex.docs) for ex in todo)
            )
            ranked = {ex.id: {"ranking": i.tolist(), "scores": [round(v, 6) for v in s.tolist()]}
                      for ex, i, s in zip(todo, indices, scores)}
        found = [recorded.get(ex.id) or ranked[ex.id] for ex in batch]
        return [f["ranking"] for f in found], [f["scores"] for f in found]


def recorded_rankings(out_dir: Path, config: dict, skip: Path) -> dict[str, dict]:
    """CLaRa's rankings that other runs in `out_dir` recorded under the same [`RANKING_FIELDS`], by example id.

    Ranking compresses every candidate of a question (10 to 20 passages for one answer), most of a CLaRa run's time;
    a method run later on the same model and file (the fine-tuned text reader once it is trained) reads the
    ranking its CLaRa row read instead of computing it again. Empty unless `config` ranks by CLaRa.
    """
    if config.get("ranking") != "clara":
        return {}
    recorded = {}
    for settings_path in sorted(out_dir.glob("*.config.json")):
        predictions = settings_path.with_name(settings_path.name.removesuffix(".config.json") + ".jsonl")
        if predictions == skip or not predictions.exists():
            continue
        settings = json.loads(settings_path.read_text())
        if all(settings.get(field) == config.get(field) for field in RANKING_FIELDS):
            recorded.update(
                (r["id"], {"ranking": r["ranking"], "scores": r.get("scores")})
                for r in read_complete_records(predictions) if r.get("ranking") is not None
            )
    return recorded


def adapter_digest(model: ClaraForRAG) -> str:
    """The first 16 hex digits of [`weights_sha256`] over the model's LoRA weights. Results are resumed by model name,
    and a name can be reused (a retrained `shipped`, a checkpoint folder written again): the digest tells the two
    models apart. Fresh models are seeded."""
    return weights_sha256(adapter_weights(model))[:16]


def _non_gold_candidates(example: EvalExample) -> list[int]:
    others = [i for i in range(len(example.docs)) if i not in example.pos_index]
    if not others:
        raise ValueError(f"example {example.id!r}: every candidate is gold, so clara_wrong_memory has none to read")
    return others


@dataclass
class MethodSpec:
    ranker: str | None  # None: no documents; "clara": the query reasoner, or the given order without one
    reads: str  # "compressed" | "text" | "nothing"
    fixed_setting: str | None = None  # methods that ignore --setting
    fine_tuned_reader: bool = False  # text read by the `--text-reader` model instead of the bare backbone


METHOD_SPECS = {
    "clara": MethodSpec("clara", "compressed"),
    "clara_wrong_memory": MethodSpec("non_gold", "compressed", fixed_setting="normal"),
    "closed_book": MethodSpec(None, "nothing", fixed_setting="none"),
    "text_rag_bm25": MethodSpec("bm25", "text"),
    "text_rag_minilm": MethodSpec("minilm", "text"),
    "text_oracle": MethodSpec("given_order", "text", fixed_setting="oracle"),
    "text_rag_clara": MethodSpec("clara", "text"),
    "text_reader": MethodSpec("clara", "text", fine_tuned_reader=True),
}


class EvalMethod:
    """One method of `METHODS` on a model: ranks, selects k, and answers a batch of examples.

    Args:
        text_reader: The fine-tuned text reader ([`load_text_reader`]) that `text_reader` generates with, and
            `text_reader_name` what its results record (its folder).
    """

    def __init__(
        self, name: str, model: ClaraForRAG, compressed: CompressedDocuments | None = None,
        text_reader: PreTrainedModel | None = None, text_reader_name: str | None = None,
    ):
        if name not in METHOD_SPECS:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
        self.name, self.model, self.spec = name, model, METHOD_SPECS[name]
        if self.spec.fine_tuned_reader and text_reader is None:
            raise ValueError(f"method {name!r} needs a trained text reader (clara eval --text-reader DIR)")
        self.text_reader = text_reader if self.spec.fine_tuned_reader else None
        self.text_reader_name = text_reader_name if self.spec.fine_tuned_reader else None
        self.compressed = compressed or CompressedDocuments(model)
        ranker = self.spec.ranker
        if ranker == "clara" and not model.has_query_reasoner:
            ranker = "given_order"
        self.ranker = Ranker(ranker, model, self.compressed) if ranker else None

    def setting(self, requested: str) -> str:
        return self.spec.fixed_setting or requested

    @cached_property
    def adapter_digest(self) -> str:
        """The model's [`adapter_digest`], hashed once per method however many files it evaluates."""
        return adapter_digest(self.model)

    @cached_property
    def text_reader_digest(self) -> str:
        """The first 16 hex digits of [`weights_sha256`] over the text reader's weights: a folder trained again
        gives other predictions under the same name."""
        return weights_sha256(self.text_reader.state_dict())[:16]

    def config(self, setting: str, k: int, max_new_tokens: int, model_name: str) -> dict:
        """What the predictions depend on; a resumed run must match it."""
        config = self.model.config
        fields = {"method": self.name, "setting": self.setting(setting), "max_new_tokens": max_new_tokens,
                  "backbone": config.decoder_model_name, "ranking": self.ranker.name if self.ranker else None}
        if self.spec.reads != "nothing":
            fields.update(k=k, doc_max_length=config.doc_max_length)
        if self.spec.reads == "compressed" or self.ranker and self.ranker.name == "clara":
            fields.update(model=model_name, compr_rate=config.compr_rate, training_stage=config.training_stage,
                          adapters=sorted(self.model.adapter_names), adapter_digest=self.adapter_digest)
        if self.text_reader is not None:
            fields.update(text_reader=self.text_reader_name, text_reader_digest=self.text_reader_digest)
        return fields

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to text prompts: the fine-tuned reader's, or the bare backbone's."""
        if self.text_reader is None:
            return generate_text(self.model, prompts, max_new_tokens)
        return generate_completions(self.text_reader, self.model.tokenizer, prompts, max_new_tokens)

    def run(
        self, batch: list[EvalExample], setting: str, k: int, max_new_tokens: int,
        recorded_rankings: dict[str, dict] | None = None,
    ) -> list[dict]:
        """Per example: prediction, ranking (and scores), the candidates read, and the prompt length in tokens.
        `recorded_rankings`: see [`Ranker.rank`]."""
        setting = self.setting(setting)
        if self.ranker is None:
            rankings, scores, selections = [None] * len(batch), None, [[] for _ in batch]
        else:
            rankings, scores = self.ranker.rank(batch, recorded_rankings)
            selections = [select_documents(r, ex.pos_index, setting, k) for ex, r in zip(batch, rankings)]
        questions = [ex.question for ex in batch]
        if self.spec.reads == "compressed":
            read = [[ex.docs[i] for i in s] for ex, s in zip(batch, selections)]
            embeds = list(self.compressed([d for docs in read for d in docs]).split([len(d) for d in read]))
            # k >= the documents given: `answer` reads them as given, in this order.
            predictions = self.model.answer(questions, embeds, k=max(k, 1), max_new_tokens=max_new_tokens)
            prompts = [self.model.processor.build_prompt(len(s), question=q)[0] for q, s in zip(questions, selections)]
        else:
            limit = self.model.config.doc_max_length
            prompts = [
                text_prompt(self.model, ex.question, [truncate_passage(self.model.tokenizer, ex.docs[i], limit) for i in s])
                for ex, s in zip(batch, selections)
            ]
            predictions = self.generate_text(prompts, max_new_tokens)
        prompt_tokens = count_tokens(self.model.tokenizer, prompts)
        return [
            {"prediction": p, "ranking": r, "scores": None if scores is None else scores[i], "selected": s,
             "prompt_tokens": n}
            for i, (p, r, s, n) in enumerate(zip(predictions, rankings, selections, prompt_tokens))
        ]


# ----------------------------------------------------------------------------------------------------------------
# Resumable runs and scoring


def run_resumable(
    examples: list[EvalExample], path: Path, config: dict, run_batch, batch_size: int, desc: str
) -> list[dict]:
    """Run `run_batch(batch) -> records` over the examples not yet in the JSONL at `path`; append and sync each batch.

    `config` is stored next to the predictions (`<path>.config.json`); resuming with a different one raises.
    Returns the records of all `examples`, in order.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    record_settings(
        path.with_suffix(".config.json"), config,
        conflict=f"{path} holds predictions of another run",
        advice="use another --output-dir or delete it to start over",
    )
    done = {record["id"]: record for record in read_for_resume(path)}
    todo = [ex for ex in examples if ex.id not in done]
    if len(todo) < len(examples):
        logger.info(f"{path}: {len(examples) - len(todo)} of {len(examples)} examples already done, resuming")
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with open(path, "ab") as out:
        for batch in logging.tqdm(batches, desc=desc, unit="batch", disable=not batches):
            start = time.perf_counter()
            records = run_batch(batch)
            seconds = (time.perf_counter() - start) / len(batch)
            records = [{"id": ex.id, **record, "seconds": round(seconds, 4)} for ex, record in zip(batch, records)]
            done.update((record["id"], record) for record in records)
            append_jsonl(out, records)
    return [done[ex.id] for ex in examples]


def score_record(example: EvalExample, result: dict) -> dict:
    """The question, answers and method output with the per-example metrics and ranking recalls."""
    record = {"question": example.question, "answers": example.answers, "pos_index": example.pos_index, **result}
    record.update(score_example(result["prediction"], example.answers))
    if example.pos_index and result.get("ranking") is not None:
        record.update({f"recall@{k}": recall_at_k(result["ranking"], example.pos_index, k) for k in RECALL_KS})
        record["gold_read"] = recall_at_k(result["selected"], example.pos_index, max(len(result["selected"]), 1))
    return record


def summarize(records: list[dict], **fields) -> dict:
    """Means over records, in percent (metrics and recalls), plus mean prompt tokens and seconds per example."""
    summary = {**fields, "n": len(records)}
    for key in METRIC_KEYS + RANKING_KEYS:
        values = [r[key] for r in records if key in r]
        if values:
            summary[key] = round(100 * sum(values) / len(values), 2)
    for key in ("prompt_tokens", "seconds"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[key] = round(sum(values) / len(values), 3)
    return summary


def run_name(method: str, setting: str, k: int) -> str:
    return "closed_book" if setting == "none" else f"{method}-{setting}-k{k}"


def evaluate_file(
    model: ClaraForRAG,
    data: str | os.PathLike,
    method: str | EvalMethod = "clara",
    setting: str = "normal",
    k: int | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    output_dir: str | os.PathLike = "eval_results",
    model_name: str | None = None,
) -> dict:
    """Evaluate one method on one file, resuming from earlier predictions. Returns the summary (also written).

    Args:
        method: A name of `METHODS`, or an [`EvalMethod`] (to share its compression cache between runs).
        setting: `"normal"` or `"oracle"` (see the module docstring).
        k: Documents read per question; default: the model's `generation_top_k`.
        model_name: Recorded with CLaRa runs; defaults to the model's `name_or_path`.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r} is not one of {SETTINGS}")
    k = model.config.generation_top_k if k is None else k
    check_positive("k", k)
    runner = method if isinstance(method, EvalMethod) else EvalMethod(method, model)
    setting = runner.setting(setting)
    examples = load_eval_data(data, limit)
    if setting == "oracle":
        missing = [ex.id for ex in examples if not ex.pos_index]
        if missing:
            raise ValueError(f"{data}: the Oracle setting needs `pos_index`; empty for ids {missing[:5]}")
    model_name = model_name or str(model.name_or_path)
    name = run_name(runner.name, setting, k)
    out_dir = Path(output_dir) / Path(data).stem
    examples_by_id = {ex.id: ex for ex in examples}

    config = {**runner.config(setting, k, max_new_tokens, model_name), "data": str(Path(data).resolve())}
    path = out_dir / f"{name}.jsonl"
    rankings = recorded_rankings(out_dir, config, skip=path)

    def run_batch(batch):
        results = runner.run(batch, setting, k, max_new_tokens, rankings)
        return [score_record(examples_by_id[ex.id], r) for ex, r in zip(batch, results)]

    records = run_resumable(examples, path, config, run_batch, batch_size, f"{name} {Path(data).stem}")
    summary = summarize(
        records, dataset=Path(data).stem, method=runner.name, setting=setting, k=k if setting != "none" else 0,
        ranking=config["ranking"], compr_rate=model.config.compr_rate if runner.spec.reads == "compressed" else None,
        model=runner.text_reader_name or (model_name if runner.spec.reads == "compressed" else config["backbone"]),
        max_new_tokens=max_new_tokens,
        data=str(data),
    )
    write_text_atomic(out_dir / f"{name}.summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / f"{name}.summary.md", markdown_table([summary]))
    return summary


def evaluate_retrieval(
    data: str | os.PathLike,
    ranker: str | Ranker,
    model: ClaraForRAG | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    output_dir: str | os.PathLike = "eval_results",
    model_name: str | None = None,
) -> dict:
    """Recall@1/3/5 of one ranker (`RANKERS`) over each question's candidates; resumable like `evaluate_file`."""
    ranker = ranker if isinstance(ranker, Ranker) else Ranker(ranker, model)
    examples = [ex for ex in load_eval_data(data, limit) if ex.pos_index]
    config = {"ranker": ranker.name, "data": str(Path(data).resolve())}
    if ranker.name == "clara":
        config.update(model=model_name or str(ranker.model.name_or_path), compr_rate=ranker.model.config.compr_rate,
                      doc_max_length=ranker.model.config.doc_max_length, adapter_digest=adapter_digest(ranker.model))

    def run_batch(batch):
        rankings, scores = ranker.rank(batch)
        records = []
        for i, (ex, ranking) in enumerate(zip(batch, rankings)):
            record = {"ranking": ranking, "scores": None if scores is None else scores[i], "pos_index": ex.pos_index}
            record.update({f"recall@{k}": recall_at_k(ranking, ex.pos_index, k) for k in RECALL_KS})
            records.append(record)
        return records

    out_dir = Path(output_dir) / Path(data).stem
    path = out_dir / f"retrieval-{ranker.name}.jsonl"
    records = run_resumable(examples, path, config, run_batch, batch_size, f"retrieval-{ranker.name} {Path(data).stem}")
    summary = summarize(
        records, dataset=Path(data).stem, method="retrieval", ranking=ranker.name, compr_rate=config.get("compr_rate"),
        model=config.get("model"), data=str(data),
    )
    summary.pop("gold_read", None)
    write_text_atomic(out_dir / f"retrieval-{ranker.name}.summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Tables


TABLE_COLUMNS = (
    ("dataset", "data"), ("method", "method"), ("setting", "setting"), ("ranking", "ranking"), ("k", "k"),
    ("compr_rate", "CR"), ("n", "n"), ("apple_em", "EM"), ("apple_f1", "F1"), ("apple_cover_em", "CEM"),
    ("em", "EM (max)"), ("f1", "F1 (max)"), ("cover_em", "CEM (max)"), ("recall@1", "R@1"), ("recall@3", "R@3"),
    ("recall@5", "R@5"), ("gold_read", "gold read"), ("prompt_tokens", "prompt tokens"), ("seconds", "s/example"),
)


def markdown_table(summaries: list[dict], columns=TABLE_COLUMNS) -> str:
    """Summaries as a markdown table; metrics in percent, columns absent from every summary dropped."""
    columns = [(key, title) for key, title in columns if any(s.get(key) is not None for s in summaries)]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        cells = [s.get(key) for key, _ in columns]
        lines.append("| " + " | ".join(_format_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _format_cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.2f}"
    return str(value)


def collect_summaries(output_dir: str | os.PathLike) -> list[dict]:
    """Every `*.summary.json` under a folder, sorted by dataset, method, setting, compression rate."""
    summaries = [json.loads(p.read_text()) for p in sorted(Path(output_dir).rglob("*.summary.json"))]
    order = {m: i for i, m in enumerate(METHODS + ("retrieval",))}
    return sorted(
        summaries,
        key=lambda s: (s["dataset"], order.get(s["method"], 99), s.get("setting") or "", s.get("ranking") or "",
                       s.get("compr_rate") or 0),
    )


# ----------------------------------------------------------------------------------------------------------------
# CLaRa minus text: paired bootstrap intervals

DIFFERENCE_METRICS = ("apple_em", "apple_f1", "apple_cover_em")
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95


def paired_bootstrap(
    a: list[float], b: list[float], n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = 0,
) -> dict:
    """The mean of `a - b` over paired examples and its percentile bootstrap interval (examples resampled with
    replacement, `n_resamples` times): `{"difference", "low", "high", "n"}`."""
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if differences.ndim != 1 or len(a) != len(b) or not len(differences):
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists; got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    resampled = differences[rng.integers(0, len(differences), size=(n_resamples, len(differences)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return {"difference": float(differences.mean()), "low": float(low), "high": float(high), "n": len(differences)}


def text_methods() -> list[str]:
    return [name for name, spec in METHOD_SPECS.items() if spec.reads == "text"]


def difference_rows(output_dir: str | os.PathLike, baseline: str = "clara") -> list[dict]:
    """CLaRa minus each text method on the same data file, setting and k, per metric of `DIFFERENCE_METRICS` (in
    points of percent), with [`paired_bootstrap`] intervals over the questions both runs answered."""
    rows = []
    for baseline_path in sorted(Path(output_dir).glob(f"*/{baseline}-*.jsonl")):
        suffix = baseline_path.name.removeprefix(baseline)  # "-normal-k2.jsonl"
        by_id = {r["id"]: r for r in read_complete_records(baseline_path)}
        for method in text_methods():
            other_path = baseline_path.with_name(method + suffix)
            if not other_path.exists():
                continue
            others = {r["id"]: r for r in read_complete_records(other_path)}
            ids = [i for i in by_id if i in others]
            if not ids:
                continue
            row = {"dataset": baseline_path.parent.name, "run": baseline_path.stem, "minus": other_path.stem}
            for metric in DIFFERENCE_METRICS:
                row[metric] = paired_bootstrap([100 * by_id[i][metric] for i in ids],
                                               [100 * others[i][metric] for i in ids])
            rows.append(row)
    return rows


def difference_table(rows: list[dict]) -> str:
    """[`difference_rows`] as markdown: each metric's difference and its interval, in points."""
    titles = {"apple_em": "EM", "apple_f1": "F1", "apple_cover_em": "CEM"}
    interval = f"{BOOTSTRAP_CONFIDENCE:.0%} CI"
    headers = [f"{titles[m]} diff [{interval}]" for m in DIFFERENCE_METRICS]
    lines = ["| data | CLaRa run | minus | n | " + " | ".join(headers) + " |", "|" + "---|" * (4 + len(headers))]
    for row in rows:
        cells = [f"{row[m]['difference']:+.1f} [{row[m]['low']:+.1f}, {row[m]['high']:+.1f}]"
                 for m in DIFFERENCE_METRICS]
        n = row[DIFFERENCE_METRICS[0]]["n"]
        lines.append(f"| {row['dataset']} | {row['run']} | {row['minus']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Output folders


def default_output_dir(model: ClaraForRAG, name: str) -> str:
    tag = f"embedded-cr{model.config.compr_rate}" if name == EMBEDDED_BACKBONE else Path(name.rstrip("/")).name
    return str(Path("eval_results") / tag)


__all__ = [
    "EvalExample", "EvalMethod", "Ranker", "CompressedDocuments", "evaluate_file", "evaluate_retrieval",
    "load_eval_data", "select_documents", "text_prompt", "generate_text", "markdown_table", "collect_summaries",
    "paired_bootstrap", "difference_rows", "difference_table", "METHODS", "SETTINGS", "RANKERS",
]
