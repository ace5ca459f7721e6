"""What the server's batches run: compress, search and answer on `ClaraForRAG`'s public methods.

Every function takes a list of requests (one batch) and returns one result per request, in order. A request the
model would reject (a prompt too long for the generator, a search without an index) gets a `RequestError` as
its result, so the rest of its batch still runs. Answers are chosen per request by the rule `model.answer`
applies (retrieve the top `k` when the model has a query reasoner and more than `k` candidates, otherwise read the
documents in order), so a batched request answers exactly as it would alone.

One shortcut makes a batch cheaper without changing what it computes (beyond float rounding): the generator runs
the start that every answer prompt shares once, not once per request (`TransformersGenerator`). (Questions are
encoded without the encoder layout's padding by the model itself, `ClaraForRAG.encode_queries`.)
"""

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.utils import logging

from ..configuration_clara import DECODER_ADAPTER
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
    """Greedy generation with transformers `generate`: a whole batch in one call, the shared prompt start run once.

    Every answer prompt starts with the same tokens, the chat template's system turn up to the first document slot
    (37 of the shipped model's 93 prompt tokens with 2 documents). Their keys and values are computed once, at the
    first call, and each batch starts from a copy of that cache, so prefill (compute-bound on CPU: it grows with
    the tokens of the whole batch) runs only the rest of each prompt. Rows are laid out as shared start, left
    padding, rest of the prompt: the start stays at positions 0..P-1 in every row, and `generate` numbers each
    row's positions from its attention mask, so every token sits where it would in `answer`'s left-padded prompt.
    """

    name = "transformers"

    def __init__(self, model: ClaraForRAG):
        self.model = model
        self._prefix_ids: list[int] | None = None
        self._prefix_cache = None  # the shared start's keys and values, for a batch of one

    @torch.no_grad()
    def generate(self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int) -> list[str]:
        model = self.model
        prompts = [model.processor.build_prompt(len(m), task="answer", question=q)[0]
                   for q, m in zip(questions, memories)]
        prefix, cache = self._shared_start()
        prompts_ids = model.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        input_ids, attention_mask = self._layout_after(prefix, prompts_ids)
        memory = torch.cat(memories).to(model.device)  # (total docs, n_mem, hidden), in request order
        inputs_embeds = model._replace_memory_embeddings(input_ids, memory, [len(m) for m in memories])
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(prompts))
        with model.adapter(DECODER_ADAPTER):
            output_ids = model.decoder.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                past_key_values=cache, do_sample=False, max_new_tokens=max_new_tokens)
        return [text.strip() for text in model.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]

    def _shared_start(self) -> tuple[list[int], object]:
        """The tokens every answer prompt starts with, and their cache (computed on the first call)."""
        if self._prefix_cache is None:
            model = self.model
            prompt = model.processor.build_prompt(1, task="answer", question="")[0]
            ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            self._prefix_ids = ids[: ids.index(model.processor.mem_token_ids[0])]
            prefix = torch.tensor([self._prefix_ids], device=model.device)
            with model.adapter(DECODER_ADAPTER):
                self._prefix_cache = model.decoder(input_ids=prefix, use_cache=True).past_key_values
        return self._prefix_ids, self._prefix_cache

    def _layout_after(self, prefix: list[int], prompts_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)`, `(n, seq)` each: the shared start, left padding, the rest of each prompt."""
        if any(ids[: len(prefix)] != prefix for ids in prompts_ids):
            raise RuntimeError("an answer prompt does not start with the shared start of the prompt template")
        rest = self.model.tokenizer.pad({"input_ids": [ids[len(prefix) :] for ids in prompts_ids]}, padding="longest",
                                        return_tensors="pt")
        n = len(prompts_ids)
        start = torch.tensor(prefix).expand(n, -1)
        input_ids = torch.cat([start, rest["input_ids"]], dim=1)
        attention_mask = torch.cat([torch.ones_like(start), rest["attention_mask"]], dim=1)
        return input_ids.to(self.model.device), attention_mask.to(self.model.device)

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
            all_scores, all_indices = self.model.retrieve(
                [requests[p].question for p in ranked], [memory_of[p] for p in ranked], k=k
            )
            for p, scores, indices in zip(ranked, all_scores, all_indices):
                idx = indices.tolist()
                hits = [Hit(str(j), score, requests[p].documents[j]) for j, score in zip(idx, scores.tolist())]
                chosen[p] = (memory_of[p][idx], hits)
        return chosen

    def _choose_from_index(self, positions: list[int], requests, k: int) -> dict:
        found = self._search([requests[p].question for p in positions], k)
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
