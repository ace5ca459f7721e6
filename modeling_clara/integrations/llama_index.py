"""CLaRa in LlamaIndex (`pip install clara-hf[llama-index]`): `ClaraRetriever` and `ClaraQueryEngine`.

    retriever = ClaraRetriever(index=index, k=4)       # NodeWithScore(TextNode(id_=document id), score=cosine)
    engine = ClaraQueryEngine(index=index)             # answers from CLaRa memory of the top-k documents
    response = engine.query("Which river flows through Paris?")
    response.response, response.source_nodes           # the answer and the documents it read

Both run on a `ClaraIndex` in this process or on a `clara serve` server (`base_url`). LlamaIndex's own retrievers
hand text to an LLM; CLaRa's generator reads the documents' compressed memory instead, so the query engine is
CLaRa's, not a `RetrieverQueryEngine` with a synthesizer.
"""

import asyncio

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import Response
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from .backends import DEFAULT_TIMEOUT_S, GenerationOptions, LocalClara, ReadDocument, RemoteClara


def _backend(index, base_url: str | None, api_key: str | None, k: int | None, timeout: float):
    if (index is None) == (base_url is None):
        raise ValueError("pass either `index` (a ClaraIndex with its model) or `base_url` (a clara serve server)")
    if base_url is not None:
        return RemoteClara(base_url, api_key, k, timeout)
    if index.model is None:
        raise ValueError("the index has no model: ClaraIndex.load(path, model=...) or index.attach_model(model)")
    return LocalClara(index.model, index, k)


def _node(document: ReadDocument) -> NodeWithScore:
    return NodeWithScore(node=TextNode(id_=document.id, text=document.text), score=document.score)


class ClaraRetriever(BaseRetriever):
    """The top `k` documents of a question by CLaRa's query reasoner, as `NodeWithScore`s (node id: the document
    id; score: the cosine), from a `ClaraIndex` or a `clara serve` server's `/v1/search`."""

    def __init__(self, index=None, base_url: str | None = None, api_key: str | None = None, k: int = 4,
                 timeout: float = DEFAULT_TIMEOUT_S, callback_manager: CallbackManager | None = None, **kwargs):
        self._clara, self._k = _backend(index, base_url, api_key, k, timeout), k
        super().__init__(callback_manager=callback_manager, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [_node(hit) for hit in self._clara.search(query_bundle.query_str, self._k)]


class ClaraQueryEngine(BaseQueryEngine):
    """Answers a query from CLaRa memory: the top `k` documents (default the model's `generation_top_k`) compressed
    and read by the generator. The `Response` holds the answer, the documents read as `source_nodes`, and in
    `metadata` the `finish_reason` and the token `usage` (the generator's prompt, memory slots included).

    `temperature` 0 is greedy; `max_new_tokens`, `top_p`, `seed` and `stop` as OpenAI's.
    """

    def __init__(self, index=None, base_url: str | None = None, api_key: str | None = None, k: int | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, stop: list[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 callback_manager: CallbackManager | None = None):
        self._clara = _backend(index, base_url, api_key, k, timeout)
        self._options = GenerationOptions(max_new_tokens, temperature, top_p, seed, list(stop or []))
        super().__init__(callback_manager)

    def _get_prompt_modules(self) -> dict:
        return {}  # CLaRa's prompt layout is the model's processor's, not a LlamaIndex template

    def _query(self, query_bundle: QueryBundle) -> Response:
        answer = self._clara.answer(query_bundle.query_str, self._options)
        usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}
        return Response(response=answer.text, source_nodes=[_node(d) for d in answer.documents],
                        metadata={"finish_reason": answer.finish_reason, "usage": usage, "model": answer.model})

    async def _aquery(self, query_bundle: QueryBundle) -> Response:
        return await asyncio.to_thread(self._query, query_bundle)


__all__ = ["ClaraQueryEngine", "ClaraRetriever"]
