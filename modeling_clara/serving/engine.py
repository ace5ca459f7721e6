"""What the server's batches run: compress, search and answer on `ClaraForRAG`'s public methods.

Every function takes a list of requests (one batch) and returns one result per request, in order. A request the
model would reject (a prompt too long for the generator, a search without an index) gets a `RequestError` as
its result, so the rest of its batch still runs. Answers are chosen per request by the rule `model.answer`
applies (retrieve the top `k` when the model has a query reasoner and more than `k` candidates, otherwise read the
documents in order), so a batched request answers exactly as it would alone.
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.utils import logging

from ..index import ClaraIndex
from ..modeling_clara import ClaraForRAG
from ..processing_clara import MAX_PROMPT_TOKENS

logger = logging.get_logger(__name__)


class RequestError(ValueError):
    """A request the model cannot serve as asked; `field` names the request field to change (HTTP 4xx)."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass
class Hit:
    """A document an answer read or a search found. `id`: the index's id, or the position in the request's
    `documents`; `score`: CLaRa's cosine, `None` for given documents read in order without retrieval."""

    id: str
    score: float | None
    text: str


@dataclass
class AnswerRequest:
    question: str
    documents: list[str] | None  # None: retrieve from the index
    k: int
    max_new_tokens: int


@dataclass
class AnswerResult:
    answer: str
    documents: list[Hit]


@dataclass
class SearchRequest:
    question: str
    k: int


class Generator(Protocol):
    """Generates answers from questions and the memory of the documents to read, `(n_docs, n_mem, hidden)` each."""

    name: str

    def generate(self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int) -> list[str]: ...

    def close(self) -> None:
        """Release what the generator started (engine processes)."""


class TransformersGenerator:
    """Generation with the model's own `answer` (transformers `generate`, greedy)."""

    name = "transformers"

    def __init__(self, model: ClaraForRAG):
        self.model = model

    def generate(self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int) -> list[str]:
        # k as large as the largest memory, so `answer` reads every given document in order and retrieves nothing:
        # the documents were already chosen per request.
        k = max(len(memory) for memory in memories)
        return self.model.answer(questions, memories, k=k, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        pass  # runs in this process: nothing to release


class ClaraServingEngine:
    """The model, an optional index, and a generator; the batch functions of `clara serve`."""

    def __init__(self, model: ClaraForRAG, index: ClaraIndex | None = None, generator: Generator | None = None,
                 compress_batch_size: int = 8):
        self.model, self.index = model, index
        self.generator = generator or TransformersGenerator(model)
        self.compress_batch_size = compress_batch_size

    # -- compress -----------------------------------------------------------------------------------------------

    def compress_batch(self, documents: list[list[str]]) -> list[torch.Tensor]:
        """One `compress` call over every request's documents; `(n_docs_i, n_mem, hidden)` per request."""
        flat = [doc for docs in documents for doc in docs]
        memory = self.model.compress(flat, batch_size=self.compress_batch_size, show_progress_bar=False)
        return list(memory.cpu().split([len(docs) for docs in documents]))

    # -- search -------------------------------------------------------------------------------------------------

    def search_batch(self, requests: list[SearchRequest]) -> list[list[Hit] | RequestError]:
        """One query-reasoner call and index search per distinct `k` in the batch."""
        problem = self.search_problem()
        if problem is not None:
            return [problem] * len(requests)
        results: list = [None] * len(requests)
        for k, positions in _group_by(requests, lambda r: r.k).items():
            found = self.index.search([requests[i].question for i in positions], k=k)
            for i, result in zip(positions, found):
                results[i] = [Hit(doc_id, score, text) for doc_id, score, text in zip(result.ids, result.scores, result.texts)]
        return results

    def search_problem(self) -> RequestError | None:
        """Why this server cannot search (no index, no query reasoner), or `None`."""
        if self.index is None:
            return RequestError(None, "this server has no index: start it with --index (or --corpus)", status=400)
        if not self.model.has_query_reasoner:
            return RequestError(None, f"the model has no query reasoner (adapters: {self.model.adapter_names}); "
                                "searching needs an end-to-end (stage 3) CLaRa", status=400)
        return None

    # -- answer -------------------------------------------------------------------------------------------------

    def answer_batch(self, requests: list[AnswerRequest]) -> list[AnswerResult | RequestError]:
        """Compress the given documents in one call, search the index for the others, then one generate call.

        All requests of a batch share `max_new_tokens` (the batcher groups by it).
        """
        results: list = [self.answer_problem(r) for r in requests]
        valid = [i for i, r in enumerate(results) if r is None]
        chosen = {}
        with_documents = [i for i in valid if requests[i].documents is not None]
        if with_documents:
            memories = self.compress_batch([requests[i].documents for i in with_documents])
            chosen.update(self._choose_given(requests, with_documents, memories))
        from_index = [i for i in valid if requests[i].documents is None]
        for k, positions in _group_by([requests[i] for i in from_index], lambda r: r.k).items():
            chosen.update(self._choose_from_index([from_index[p] for p in positions], requests, k))
        for i in valid:
            results[i] = self._prompt_problem(requests[i], n_docs=len(chosen[i][0]))
        valid = [i for i in valid if results[i] is None]
        if valid:
            answers = self.generator.generate([requests[i].question for i in valid], [chosen[i][0] for i in valid],
                                              max_new_tokens=requests[valid[0]].max_new_tokens)
            for i, text in zip(valid, answers):
                results[i] = AnswerResult(text, chosen[i][1])
        return results

    def answer_problem(self, request: AnswerRequest) -> RequestError | None:
        """Why this server cannot answer `request` (no documents and no index to retrieve from), or `None`."""
        if request.documents is not None:
            return None
        if self.index is None:
            return RequestError("documents", "`documents` is required: this server has no index (start it with --index)")
        return self.search_problem()

    def _choose_given(self, requests, positions: list[int], memories: list[torch.Tensor]) -> dict:
        """Per request: the memory to read and its hits. As `model.answer`: retrieve the top k only when the model
        has a query reasoner and more than k documents were given."""
        chosen = {}
        to_rank = [p for p, memory in zip(positions, memories) if self.model.has_query_reasoner and len(memory) > requests[p].k]
        memory_of = dict(zip(positions, memories))
        for p in positions:  # read in order, unscored
            chosen[p] = (memory_of[p], [Hit(str(j), None, text) for j, text in enumerate(requests[p].documents)])
        for k, group in _group_by([requests[p] for p in to_rank], lambda r: r.k).items():
            ranked = [to_rank[g] for g in group]
            scores, indices = self.model.retrieve([requests[p].question for p in ranked], [memory_of[p] for p in ranked], k=k)
            for p, s, idx in zip(ranked, scores, indices):
                idx = idx.tolist()
                hits = [Hit(str(j), score, requests[p].documents[j]) for j, score in zip(idx, s.tolist())]
                chosen[p] = (memory_of[p][idx], hits)
        return chosen

    def _choose_from_index(self, positions: list[int], requests, k: int) -> dict:
        found = self.index.search([requests[p].question for p in positions], k=k)
        return {
            p: (self.index.embeddings(result.positions), [Hit(i, s, t) for i, s, t in zip(result.ids, result.scores, result.texts)])
            for p, result in zip(positions, found)
        }

    def _prompt_problem(self, request: AnswerRequest, n_docs: int) -> RequestError | None:
        """A prompt the generator would refuse, found before it could fail the whole batch."""
        prompt = self.model.processor.build_prompt(n_docs, task="answer", question=request.question)[0]
        n_tokens = len(self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_tokens <= MAX_PROMPT_TOKENS:
            return None
        return RequestError("question", f"the prompt with {n_docs} documents has {n_tokens} tokens, more than the "
                            f"generator's {MAX_PROMPT_TOKENS}; shorten the question or lower k")


def _group_by(items: list, key) -> dict:
    """Positions of `items` grouped by `key(item)`, in first-seen order."""
    groups = defaultdict(list)
    for position, item in enumerate(items):
        groups[key(item)].append(position)
    return dict(groups)
