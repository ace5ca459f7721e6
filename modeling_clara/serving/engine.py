"""What the server's batches run: compress, search and answer on `ClaraForRAG`'s public methods.

Every function takes a list of requests (one batch) and returns one result per request, in order. A request the
model would reject (a prompt too long for the generator, a search without an index) gets a `RequestError` as
its result, so the rest of its batch still runs. Answers are chosen per request by the rule `model.answer`
applies (retrieve the top `k` when the model has a query reasoner and more than `k` candidates, otherwise read the
documents in order), so a batched request answers exactly as it would alone.

Which documents a request reads (`select_documents`), the prompt-length check (a `PromptTooLongError` of the
processor) and generation (`generate_from_memory`) are the model's; the engine only groups requests. One shortcut
makes a batch cheaper without changing what it computes (beyond float rounding), and the model provides it too: the
start every answer prompt shares runs once, not once per request (`cache_prompt_start`). Questions are encoded
without the encoder layout's padding by `ClaraForRAG.encode_queries` itself.
"""

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.utils import logging

from ..index import ClaraIndex
from ..modeling_clara import ClaraForRAG
from ..processing_clara import PromptTooLongError

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
    memory: torch.Tensor | None = None  # the documents' memory when compressed beforehand (the server: in chunks)


@dataclass
class AnswerResult:
    answer: str
    documents: list[Hit]


@dataclass
class SearchRequest:
    question: str
    k: int


class Generator(Protocol):
    """Generates answers from questions and the memory of the documents to read, `(n_docs, n_mem, hidden)` each.
    `should_stop`, when the generator can honour it, is asked between decoding steps: once true, generation ends and
    what it returns is discarded."""

    name: str

    def generate(self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int,
                 should_stop: Callable[[], bool] | None = None) -> list[str]: ...

    def close(self) -> None:
        """Release what the generator started (engine processes)."""


class TransformersGenerator:
    """Greedy generation with the model's `generate_from_memory`: a whole batch in one call, the shared prompt start
    run once.

    Every answer prompt starts with the same tokens, the chat template's system turn up to the first document slot
    (37 of the shipped model's 93 prompt tokens with 2 documents). The model caches their keys and values once
    (`cache_prompt_start`, at the first call) and each batch starts from a copy of that cache, so prefill
    (compute-bound on CPU: it grows with the tokens of the whole batch) runs only the rest of each prompt.
    """

    name = "transformers"

    def __init__(self, model: ClaraForRAG):
        self.model = model
        self._prompt_start = None

    def generate(self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int,
                 should_stop: Callable[[], bool] | None = None) -> list[str]:
        if self._prompt_start is None:
            self._prompt_start = self.model.cache_prompt_start()
        return self.model.generate_from_memory(questions, memories, max_new_tokens=max_new_tokens,
                                               prompt_start=self._prompt_start, should_stop=should_stop)

    def close(self) -> None:
        pass  # runs in this process: nothing to release


class ClaraServingEngine:
    """The model, an optional index, and a generator; the batch functions of `clara serve`."""

    def __init__(self, model: ClaraForRAG, index: ClaraIndex | None = None, generator: Generator | None = None,
                 compress_batch_size: int = 8):
        self.model, self.index = model, index
        self.generator = generator or TransformersGenerator(model)
        self.compress_batch_size = compress_batch_size
        # The prompt check runs on the server's event loop while the model thread tokenizes: a fast tokenizer must
        # not be used by two threads at once, so the check has its own.
        self._check_processor = copy.deepcopy(model.processor)

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
            found = self._search([requests[i].question for i in positions], k)
            for i, result in zip(positions, found):
                results[i] = [Hit(doc_id, score, text) for doc_id, score, text in zip(result.ids, result.scores, result.texts)]
        return results

    def _search(self, questions: list[str], k: int) -> list:
        return self.index.search(questions, k=k)

    def search_problem(self) -> RequestError | None:
        """Why this server cannot search (no index, no query reasoner), or `None`."""
        if self.index is None:
            return RequestError(None, "this server has no index: start it with --index (or --corpus)", status=400)
        if not self.model.has_query_reasoner:
            return RequestError(None, f"the model has no query reasoner (adapters: {self.model.adapter_names}); "
                                "searching needs an end-to-end (stage 3) CLaRa", status=400)
        return None

    # -- answer -------------------------------------------------------------------------------------------------

    def answer_batch(self, requests: list[AnswerRequest],
                     should_stop: Callable[[], bool] | None = None) -> list[AnswerResult | RequestError]:
        """Compress the given documents in one call, search the index for the others, then one generate call.

        All requests of a batch share `max_new_tokens` (the batcher groups by it). `should_stop`: asked between
        decoding steps; once true, generation ends early and the answers are cut short (nobody waits for them).
        """
        results: list = [self.answer_problem(r) for r in requests]
        valid = [i for i, r in enumerate(results) if r is None]
        chosen = {}
        with_documents = [i for i in valid if requests[i].documents is not None]
        to_compress = [i for i in with_documents if requests[i].memory is None]
        memory_of = {}
        if to_compress:
            memory_of = dict(zip(to_compress, self.compress_batch([requests[i].documents for i in to_compress])))
        if with_documents:
            memories = [memory_of.get(i, requests[i].memory) for i in with_documents]
            chosen.update(self._choose_given(requests, with_documents, memories))
        from_index = [i for i in valid if requests[i].documents is None]
        for k, positions in _group_by([requests[i] for i in from_index], lambda r: r.k).items():
            chosen.update(self._choose_from_index([from_index[p] for p in positions], requests, k))
        answers = self._generate(requests, valid, chosen, results, should_stop)
        for i, text in answers.items():
            results[i] = AnswerResult(text, chosen[i][1])
        return results

    def answer_problem(self, request: AnswerRequest) -> RequestError | None:
        """Why this server cannot answer `request` (no documents and no index to retrieve from), or `None`."""
        if request.documents is not None:
            return None
        if self.index is None:
            return RequestError("documents", "`documents` is required: this server has no index (start it with --index)")
        return self.search_problem()

    def prompt_problem(self, request: AnswerRequest) -> RequestError | None:
        """A prompt the generator would refuse, found from the request alone, before any model work.

        The documents read are counted by `model.select_documents`' rule: the top `k` of more candidates with a
        query reasoner (always, from the index), all of them otherwise."""
        if request.documents is None:
            n_read = min(request.k, len(self.index))
        elif self.model.has_query_reasoner:
            n_read = min(request.k, len(request.documents))
        else:
            n_read = len(request.documents)
        processor = self._check_processor
        try:
            processor.prompt_ids([processor.build_prompt(n_read, task="answer", question=request.question)[0]])
        except PromptTooLongError as error:
            return _prompt_too_long(n_read, error.lengths[0], error.max_length)
        return None

    def _choose_given(self, requests, positions: list[int], memories: list[torch.Tensor]) -> dict:
        """Per request: the memory to read and its hits, chosen by `model.select_documents` (one call per `k`)."""
        chosen, memory_of = {}, dict(zip(positions, memories))
        for k, group in _group_by([requests[p] for p in positions], lambda r: r.k).items():
            group = [positions[g] for g in group]
            selected, indices, scores = self.model.select_documents(
                [requests[p].question for p in group], [memory_of[p] for p in group], k=k
            )
            for p, memory, idx, score in zip(group, selected, indices, scores):
                score = score or [None] * len(idx)  # read in order, unscored
                chosen[p] = (memory, [Hit(str(j), s, requests[p].documents[j]) for j, s in zip(idx, score)])
        return chosen

    def _choose_from_index(self, positions: list[int], requests, k: int) -> dict:
        found = self._search([requests[p].question for p in positions], k)
        return {
            p: (self.index.embeddings(result.positions), [Hit(i, s, t) for i, s, t in zip(result.ids, result.scores, result.texts)])
            for p, result in zip(positions, found)
        }

    def _generate(self, requests, positions: list[int], chosen: dict, results: list,
                  should_stop: Callable[[], bool] | None) -> dict[int, str]:
        """The answers of the requests at `positions`; a request whose prompt the generator refuses gets a
        `RequestError` in `results` instead, and the others are generated without it."""
        while positions:
            try:
                answers = self.generator.generate([requests[i].question for i in positions],
                                                  [chosen[i][0] for i in positions],
                                                  max_new_tokens=requests[positions[0]].max_new_tokens,
                                                  should_stop=should_stop)
                return dict(zip(positions, answers))
            except PromptTooLongError as error:
                for position, n_tokens in error.lengths.items():
                    n_docs = len(chosen[positions[position]][0])
                    results[positions[position]] = _prompt_too_long(n_docs, n_tokens, error.max_length)
                positions = [i for p, i in enumerate(positions) if p not in error.lengths]
        return {}


def _prompt_too_long(n_docs: int, n_tokens: int, max_length: int) -> RequestError:
    return RequestError("question", f"the prompt with {n_docs} documents has {n_tokens} tokens, more than the "
                        f"generator's {max_length}; shorten the question or lower k")


def _group_by(items: list, key) -> dict:
    """Positions of `items` grouped by `key(item)`, in first-seen order."""
    groups = defaultdict(list)
    for position, item in enumerate(items):
        groups[key(item)].append(position)
    return dict(groups)
