"""Training data for CLaRa's three stages: Apple's JSONL formats, validated, and one collator per stage.

Formats (one JSON object per line; extra fields are ignored), as Apple's `openrlhf/datasets/sft_dataset.py` reads them:

- `pretrain` (Apple `stage1`, salient compressor pretraining):
  `{"data_type": "qa", "question": [q, ...], "answers": [a, ...], "docs": [doc]}`: all QA pairs of the document form
  one target of `"Question: q\\nAnswer: a"` lines; `{"data_type": "paraphrase", "answers": [paraphrase], "docs":
  [doc]}`: the target is the paraphrase. `data_type` defaults to `"qa"`.
- `instruct` (Apple `stage1_2`): `{"question": q, "docs": [doc, ...], "answer": a}` (or `"gold_answer"`); the generator
  reads the first `generation_top_k` documents, in the given order.
- `e2e` (Apple `stage2`): `{"question": q, "docs": [candidate, ...], "gold_answer": a, "pos_index": [i, ...]}` (or
  `"answer"`; `pos_index` is optional and feeds only the retrieval loss and recall). The query reasoner picks
  `generation_top_k` of the candidates. Every example of a batch needs the same number of candidates: either every
  row has the same number, or `n_candidates` trims rows to that many (gold candidates are kept first).

Rows are checked when the file is read; a bad row is a [`ClaraDataError`] naming the file and line. The collators
hold only a [`ClaraProcessor`] and plain values, so they pickle into DataLoader workers (`dataloader_num_workers > 0`).
"""

import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import datasets
import torch
from transformers.utils import logging

from .configuration_clara import STAGE_NAMES, STAGES_BY_NAME
from .jsonl import ClaraDataError, read_jsonl
from .processing_clara import ClaraProcessor

logger = logging.get_logger(__name__)

PRETRAIN_TASKS = ("qa", "paraphrase")

FEATURES = {
    "pretrain": datasets.Features(
        {
            "task": datasets.Value("string"),
            "questions": datasets.Sequence(datasets.Value("string")),
            "answers": datasets.Sequence(datasets.Value("string")),
            "docs": datasets.Sequence(datasets.Value("string")),
        }
    ),
    "instruct": datasets.Features(
        {
            "question": datasets.Value("string"),
            "docs": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
        }
    ),
    "e2e": datasets.Features(
        {
            "question": datasets.Value("string"),
            "docs": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
            "pos_index": datasets.Sequence(datasets.Value("int64")),
        }
    ),
}


def load_clara_jsonl(
    path: str | os.PathLike, stage: str, n_candidates: int | None = None, max_samples: int | None = None
) -> datasets.Dataset:
    """Read and check one stage's JSONL file into a `datasets.Dataset` with normalised columns.

    The rows are parsed here rather than by `datasets`' JSON reader: Apple's stage-1 files mix `"question": ""`
    (paraphrase) with `"question": [...]` (qa), which Arrow cannot type, and errors must name the line.

    Args:
        path: The JSONL file.
        stage (`str`): `"pretrain"`, `"instruct"` or `"e2e"`.
        n_candidates (`int`, *optional*): `e2e` only: bring every row to this many candidates (gold ones kept
            first, then the others in file order; rows with fewer are an error). Without it all rows must have the
            same number.
        max_samples (`int`, *optional*): Read only the first this many rows.
    Returns:
        `datasets.Dataset` with columns `task, questions, answers, docs` (pretrain), `question, docs, answer`
        (instruct) or `question, docs, answer, pos_index` (e2e).
    """
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage={stage!r} is not one of {STAGE_NAMES}")
    if n_candidates is not None and (stage != "e2e" or n_candidates < 1):
        raise ValueError(f"n_candidates={n_candidates!r} needs stage='e2e' and a positive value")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such training file")
    stat = os.stat(path)
    try:
        # The file's size and mtime are in gen_kwargs so that the datasets cache never serves a stale copy.
        dataset = datasets.Dataset.from_generator(
            _generate_rows,
            features=FEATURES[stage],
            gen_kwargs={
                "path": os.path.abspath(path),
                "stage": stage,
                "n_candidates": n_candidates,
                "max_samples": max_samples,
                "file_key": (stat.st_size, stat.st_mtime_ns),
            },
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, ClaraDataError):
            raise error.__cause__ from None
        raise
    return dataset


def _generate_rows(path: str, stage: str, n_candidates: int | None, max_samples: int | None, file_key):
    check = {"pretrain": _check_pretrain_row, "instruct": _check_instruct_row, "e2e": _check_e2e_row}[stage]
    first_count = None  # e2e: candidates per row must agree unless n_candidates trims them
    n_rows = 0
    for line_number, record in read_jsonl(path, max_samples):
        where = f"{path}:{line_number}"
        row = check(record, where)
        if stage == "e2e":
            if n_candidates is not None:
                row = _trim_candidates(row, n_candidates, where)
            elif first_count is None:
                first_count = (len(row["docs"]), line_number)
            elif len(row["docs"]) != first_count[0]:
                raise ClaraDataError(
                    f"{where}: {len(row['docs'])} candidate docs, but line {first_count[1]} has {first_count[0]}; "
                    "end-to-end batches need the same number per example: pass n_candidates (--n_candidates) "
                    "to trim every row to that many"
                )
        n_rows += 1
        yield row
    if n_rows == 0:
        raise ClaraDataError(f"{path}: no rows")


def _check_pretrain_row(record: dict, where: str) -> dict:
    task = record.get("data_type", "qa")
    if task not in PRETRAIN_TASKS:
        raise ClaraDataError(f"{where}: data_type={task!r} is not one of {PRETRAIN_TASKS}")
    docs = _texts(record, "docs", where)
    answers = _texts(record, "answers", where)
    if task == "qa":
        questions = _texts(record, "question", where)
        if len(questions) != len(answers):
            raise ClaraDataError(
                f"{where}: {len(questions)} questions but {len(answers)} answers; qa rows pair them one to one"
            )
    else:
        questions = []
    return {"task": task, "questions": questions, "answers": answers, "docs": docs}


def _check_instruct_row(record: dict, where: str) -> dict:
    return {
        "question": _text(record, "question", where),
        "docs": _texts(record, "docs", where),
        "answer": _answer(record, where),
    }


def _check_e2e_row(record: dict, where: str) -> dict:
    return {**check_e2e_candidates(record, where), "answer": _answer(record, where)}


def check_e2e_candidates(record: dict, where: str) -> dict:
    """`question`, `docs` and `pos_index` (sorted, without repeats) of an end-to-end row, checked.

    Training and evaluation read these alike; each reads the answer fields it needs (one target for training, the
    accepted answers for evaluation). A bad field is a `ClaraDataError` naming `where` (file:line).
    """
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ClaraDataError(f"{where}: `question` must be a non-empty str, got {question!r:.80}")
    docs = _texts(record, "docs", where)
    pos_index = record.get("pos_index", [])
    if not isinstance(pos_index, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(docs) for i in pos_index
    ):
        raise ClaraDataError(
            f"{where}: `pos_index` must list indices into `docs` (0..{len(docs) - 1}), got {pos_index!r:.80}"
        )
    return {"question": question, "docs": docs, "pos_index": sorted(set(pos_index))}


def _trim_candidates(row: dict, n_candidates: int, where: str) -> dict:
    docs, positives = row["docs"], row["pos_index"]
    if len(docs) < n_candidates:
        raise ClaraDataError(f"{where}: {len(docs)} candidate docs, fewer than n_candidates={n_candidates}")
    if len(positives) > n_candidates:
        raise ClaraDataError(f"{where}: {len(positives)} gold docs do not fit into n_candidates={n_candidates}")
    negatives = [i for i in range(len(docs)) if i not in positives]
    kept = sorted(positives + negatives[: n_candidates - len(positives)])  # file order, so positions stay meaningful
    return {**row, "docs": [docs[i] for i in kept], "pos_index": [kept.index(i) for i in positives]}


def _answer(record: dict, where: str) -> str:
    # Apple's instruction-tuning rows carry both `answer` (the target) and `gold_answer`; end-to-end rows one of them.
    for key in ("answer", "gold_answer"):
        if key in record:
            return _text(record, key, where)
    raise ClaraDataError(f"{where}: needs `answer` or `gold_answer` (str); the row has {sorted(record)}")


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise ClaraDataError(f"{where}: missing `{key}`; the row has {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise ClaraDataError(f"{where}: `{key}` must be a str, got {type(value).__name__}: {value!r:.80}")
    if not value.strip():
        raise ClaraDataError(f"{where}: `{key}` is empty or whitespace-only")
    return value


def _texts(record: dict, key: str, where: str) -> list[str]:
    if key not in record:
        raise ClaraDataError(f"{where}: missing `{key}`; the row has {sorted(record)}")
    values = record[key]
    if not isinstance(values, list) or not values:
        raise ClaraDataError(f"{where}: `{key}` must be a non-empty list of str, got {values!r:.80}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ClaraDataError(f"{where}: `{key}[{i}]` must be a str, got {type(value).__name__}: {value!r:.80}")
        if not value.strip():
            raise ClaraDataError(f"{where}: `{key}[{i}]` is empty or whitespace-only")
    return values


def _random_words(rng: random.Random, vocabulary: list[str], n_words: int) -> list[str]:
    if n_words <= len(vocabulary):
        return rng.sample(vocabulary, n_words)
    return rng.choices(vocabulary, k=n_words)


def with_channel_rows(dataset: datasets.Dataset, rows_per_row: float, seed: int) -> datasets.Dataset:
    """`dataset` (pretrain) with `round(rows_per_row * len(dataset))` random-word-list rows added, shuffled.

    Each added row is a paraphrase row whose document and target are the same list of 8-12 words drawn from the
    vocabulary of the dataset's documents (without replacement; with replacement when the vocabulary has fewer words
    than the list, as in a task of a few short documents). The language-model prior cannot predict such a list, so only the memory
    can lower its loss: the rows open the memory channel while real text, which the prior already predicts well,
    would teach the generator to ignore it (research/recipes.md).
    """
    n_rows = round(rows_per_row * len(dataset))
    if n_rows == 0:
        return dataset
    vocabulary = sorted({word for docs in dataset["docs"] for doc in docs for word in re.findall(r"[A-Za-z]{3,}", doc)})
    if len(vocabulary) < 2:
        raise ValueError(f"channel rows need at least 2 distinct words in the documents, found {vocabulary}")
    rng = random.Random(seed)
    lists = [" ".join(_random_words(rng, vocabulary, rng.randint(8, 12))) for _ in range(n_rows)]
    channel = datasets.Dataset.from_dict(
        {"task": ["paraphrase"] * n_rows, "questions": [[]] * n_rows, "answers": [[t] for t in lists], "docs": [[t] for t in lists]},
        features=FEATURES["pretrain"],
    )
    return datasets.concatenate_datasets([dataset, channel]).shuffle(seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Collators


@dataclass
class ClaraCollator:
    """Base of the stage collators: decoder inputs with labels on the target tokens only.

    Args:
        processor ([`ClaraProcessor`]): Builds encoder layouts and prompts (tokenizer + plain values only).
        max_length (`int`): Decoder tokens per example; longer conversations lose their end, as in Apple's
            collate (`truncation=True, max_length=dec_max_len`). A prompt that does not fit is an error.
    """

    processor: ClaraProcessor
    max_length: int = 2048

    def _decoder_inputs(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Tokenize `(prompt, conversation)` pairs; labels are -100 on padding and on the prompt.

        The prompt length is that of the generation prompt tokenized alone, as Apple's `_blend_*_prompt` measures it,
        so the loss covers the answer and the template's closing tokens (eos).
        """
        tokenizer = self.processor.tokenizer
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        conversations = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
        for prompt, conversation in zip(prompts, conversations):
            if len(prompt) >= self.max_length:
                raise ValueError(
                    f"a decoder prompt has {len(prompt)} tokens, leaving no target token within max_length="
                    f"{self.max_length}; raise decoder_max_length or read fewer documents"
                )
            if conversation[: len(prompt)] != prompt:
                logger.warning_once(
                    "the chat template renders the generation prompt differently from the start of the full "
                    "conversation; the label mask follows the prompt's token count, as Apple's code does"
                )
        if any(len(c) > self.max_length for c in conversations):
            logger.warning_once(f"decoder inputs longer than max_length={self.max_length} are cut on the right")
            conversations = [c[: self.max_length] for c in conversations]
        padded = tokenizer.pad({"input_ids": conversations}, padding="longest", return_tensors="pt")
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        length = input_ids.shape[1]
        for i, (prompt, conversation) in enumerate(zip(prompts, conversations)):
            start = length - len(conversation) if tokenizer.padding_side == "left" else 0
            labels[i, : start + len(prompt)] = -100
        return {"dec_input_ids": input_ids, "dec_attention_mask": attention_mask, "labels": labels}

    def _encoder_inputs(self, texts: list[str], prefix: str) -> dict[str, torch.Tensor]:
        inputs, n_truncated = self.processor.encode_documents(texts)
        if n_truncated:
            logger.warning_once(
                f"some texts are longer than doc_max_length={self.processor.doc_max_length} tokens and are cut "
                "on the right, as in Apple's training"
            )
        return {f"{prefix}_input_ids": inputs["input_ids"], f"{prefix}_attention_mask": inputs["attention_mask"]}


@dataclass
class ClaraPretrainCollator(ClaraCollator):
    """Stage 1: each row's documents are compressed; the target is its QA lines or its paraphrase.

    Args:
        paraphrase_instruction (`int`, *optional*): Fix one of Apple's 13 paraphrase instructions; default
            `random.choice` per example, as Apple does.
    """

    paraphrase_instruction: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = []
        for row in rows:
            if row["task"] == "qa":
                pairs.append(self.processor.build_prompt(len(row["docs"]), "qa", row["questions"], row["answers"]))
            else:
                pairs.append(
                    self.processor.build_prompt(
                        len(row["docs"]), "paraphrase", answer=row["answers"][0],
                        paraphrase_instruction=self.paraphrase_instruction,
                    )
                )
        return {
            **self._encoder_inputs([doc for row in rows for doc in row["docs"]], "enc"),
            "docs_per_example": torch.tensor([len(row["docs"]) for row in rows]),
            **self._decoder_inputs(pairs),
        }


@dataclass
class ClaraInstructCollator(ClaraCollator):
    """Stage 2: the generator reads the first `top_k` documents of each row, in order, and is trained on the answer.

    Args:
        top_k (`int`): Documents read per question (`generation_top_k`; Apple's data holds exactly the top-5 retrieved).
    """

    top_k: int = 5

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        docs = [row["docs"][: self.top_k] for row in rows]
        pairs = [self.processor.build_prompt(len(d), "answer", row["question"], row["answer"]) for row, d in zip(rows, docs)]
        return {
            **self._encoder_inputs([doc for d in docs for doc in d], "enc"),
            "docs_per_example": torch.tensor([len(d) for d in docs]),
            **self._decoder_inputs(pairs),
        }


@dataclass
class ClaraE2ECollator(ClaraCollator):
    """Stage 3: candidates (compressed by the model without gradients), the question for the query reasoner, and a
    prompt with `min(top_k, n_candidates)` slots that the straight-through top-k fills.

    `positive_mask` (`(batch, n_candidates)`, from `pos_index`) feeds the retrieval loss and recall. Queries use the
    inference layout (padded to `doc_max_length + 3`), not Apple's training padding to `dec_max_len + 3`, so training
    and inference encode questions alike.

    Args:
        candidate_memory (`dict[str, torch.Tensor]`, *optional*): Each candidate text's memory, `(n_mem, hidden)`,
            computed once by the frozen compressor (`--cache_candidate_memory`); the batch then carries
            `candidate_embeds` instead of encoder inputs.
        retrieval_only (`bool`, *optional*, defaults to `False`): No decoder inputs: the model trains the query
            reasoner on the retrieval loss alone (`--retrieval_only`).
        in_batch_negatives (`bool`, *optional*, defaults to `False`): With `retrieval_only` and `candidate_memory`:
            every question ranks the distinct candidates of the whole batch, its own gold texts positive wherever
            they appear (`--in_batch_negatives`).
    """

    top_k: int = 5
    candidate_memory: dict[str, torch.Tensor] | None = None
    retrieval_only: bool = False
    in_batch_negatives: bool = False

    def __post_init__(self):
        if self.in_batch_negatives and not (self.retrieval_only and self.candidate_memory is not None):
            raise ValueError("in_batch_negatives needs retrieval_only and candidate_memory")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.in_batch_negatives:
            return self._shared_candidates(rows)
        counts = {len(row["docs"]) for row in rows}
        if len(counts) > 1:
            raise ValueError(
                f"end-to-end batches need the same number of candidates per example, got {sorted(counts)}; "
                "load the data with n_candidates to trim them"
            )
        n_candidates = counts.pop()
        positive_mask = torch.zeros(len(rows), n_candidates, dtype=torch.bool)
        for i, row in enumerate(rows):
            positive_mask[i, list(row.get("pos_index") or [])] = True
        batch = {
            **self._candidates(rows),
            **self._encoder_inputs([row["question"] for row in rows], "query"),
            "positive_mask": positive_mask,
        }
        if self.retrieval_only:
            return batch
        k = min(self.top_k, n_candidates)
        pairs = [self.processor.build_prompt(k, "answer", row["question"], row["answer"]) for row in rows]
        return {**batch, **self._decoder_inputs(pairs)}

    def _candidates(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Each row's candidates (every row has as many): encoder inputs, or their cached memory."""
        texts = [doc for row in rows for doc in row["docs"]]
        if self.candidate_memory is None:
            return self._encoder_inputs(texts, "enc")
        memory = self._cached_memory(texts)
        return {"candidate_embeds": memory.view(len(rows), -1, *memory.shape[1:])}

    def _cached_memory(self, texts: list[str]) -> torch.Tensor:
        """`(len(texts), n_mem, hidden)` from `candidate_memory`; a text it lacks is an error."""
        missing = [text for text in texts if text not in self.candidate_memory]
        if missing:
            raise ValueError(f"{len(missing)} candidates have no cached memory, e.g. {missing[0]!r:.80}")
        return torch.stack([self.candidate_memory[text] for text in texts])

    def _shared_candidates(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """A retrieval-only batch in which every question ranks all distinct candidates of the batch."""
        texts = distinct_docs(row["docs"] for row in rows)
        positive_mask = torch.tensor([[text in _gold_texts(row) for text in texts] for row in rows])
        memory = self._cached_memory(texts)
        return {
            "candidate_embeds": memory.expand(len(rows), *memory.shape),
            **self._encoder_inputs([row["question"] for row in rows], "query"),
            "positive_mask": positive_mask,
        }


def _gold_texts(row: dict) -> set[str]:
    return {row["docs"][i] for i in row.get("pos_index") or []}


def distinct_docs(docs_lists: Iterable[list[str]]) -> list[str]:
    """The distinct texts of several `docs` lists, in first-seen order."""
    return list(dict.fromkeys(doc for docs in docs_lists for doc in docs))


def unique_candidates(*e2e_datasets: datasets.Dataset | None) -> list[str]:
    """The distinct candidate texts of `e2e` datasets, in first-seen order."""
    return distinct_docs(docs for dataset in e2e_datasets if dataset is not None for docs in dataset["docs"])


def make_collator(
    stage: str, processor: ClaraProcessor, top_k: int, max_length: int | None = None, **kwargs
) -> ClaraCollator:
    """The collator of `stage` (`"pretrain"`, `"instruct"` or `"e2e"`); `max_length` defaults to Apple's per stage."""
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage={stage!r} is not one of {STAGE_NAMES}")
    max_length = STAGES_BY_NAME[stage].decoder_max_length if max_length is None else max_length
    if stage == "pretrain":
        return ClaraPretrainCollator(processor, max_length, **kwargs)
    cls = ClaraInstructCollator if stage == "instruct" else ClaraE2ECollator
    return cls(processor, max_length, top_k=top_k, **kwargs)


__all__ = [
    "ClaraCollator",
    "ClaraDataError",
    "ClaraE2ECollator",
    "ClaraInstructCollator",
    "ClaraPretrainCollator",
    "check_e2e_candidates",
    "load_clara_jsonl",
    "make_collator",
    "unique_candidates",
]
