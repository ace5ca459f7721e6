"""A corpus: documents with string `id`s and `text`s, read once by every job that takes `--corpus`.

Indexing, serving and stage-1 synthesis read their documents through [`read_corpus`]; [`corpus_fingerprint`] says
whether two corpora hold the same documents (an index cached for one corpus is not reused for another).
"""

import hashlib
import os
from collections import Counter
from pathlib import Path

import datasets

from .checkpoints import SHIPPED_CORPUS_FILE
from .processing_clara import check_texts

# `--corpus shipped`: the Wikipedia passages bundled with the package (held out from the shipped model's training).
SHIPPED_CORPUS = "shipped"


def corpus_path(corpus: str | os.PathLike) -> Path:
    """The JSONL file a corpus name stands for: `"shipped"` is the bundled one (unless a file of that name exists)."""
    if str(corpus) == SHIPPED_CORPUS and not os.path.exists(corpus):
        return Path(SHIPPED_CORPUS_FILE)
    return Path(corpus)


def read_corpus(corpus, first_id: int = 0) -> datasets.Dataset:
    """A corpus as a `Dataset` with string columns `id` and `text`.

    Accepts a list of texts, a `datasets.Dataset` with a `text` (or `contents`) column and an optional `id` column,
    a JSONL path with those fields per line, or `"shipped"` (the bundled corpus). Documents without ids are numbered
    from `first_id`.
    """
    if isinstance(corpus, (str, os.PathLike)):
        path = corpus_path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        corpus = datasets.load_dataset("json", data_files=str(path), split="train")
    if isinstance(corpus, list):
        texts = check_texts(corpus, "corpus")
        return datasets.Dataset.from_dict({"id": [str(first_id + i) for i in range(len(texts))], "text": texts})
    if not isinstance(corpus, datasets.Dataset):
        raise TypeError(f"corpus must be a list of str, a datasets.Dataset or a JSONL path, got {type(corpus).__name__}")
    text_column = next((c for c in ("text", "contents") if c in corpus.column_names), None)
    if text_column is None:
        raise ValueError(f"corpus needs a `text` (or `contents`) column; it has {corpus.column_names}")
    texts = check_texts(list(corpus[text_column]), f"corpus[{text_column!r}]")
    if "id" in corpus.column_names:
        ids = [str(i) for i in corpus["id"]]
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise ValueError(f"corpus ids must be unique; repeated: {repeated[:5]}")
    else:
        ids = [str(first_id + i) for i in range(len(texts))]
    return datasets.Dataset.from_dict({"id": ids, "text": texts})


def corpus_fingerprint(documents: datasets.Dataset) -> str:
    """SHA-256 of the documents' ids and texts, in order (a `Dataset` from [`read_corpus`])."""
    digest = hashlib.sha256()
    for batch in documents.select_columns(["id", "text"]).iter(batch_size=4096):
        for doc_id, text in zip(batch["id"], batch["text"]):
            digest.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


__all__ = ["SHIPPED_CORPUS", "corpus_fingerprint", "corpus_path", "read_corpus"]
