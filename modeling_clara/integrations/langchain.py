"""CLaRa in LangChain (`pip install clara-hf[langchain]`): `ClaraRetriever` and `ChatClara`.

Both run on a `ClaraIndex` in this process (its model searches, compresses and answers) or on a `clara serve`
server (`base_url`):

    retriever = ClaraRetriever(index=index, k=4)                 # Documents, metadata {"id", "score"}
    chat = ChatClara(index=index)                                # answers from the memory of the top-k documents
    chat = ChatClara(base_url="http://127.0.0.1:8000")           # the same, through the server

`ChatClara` answers the last human message from CLaRa memory: earlier turns and system messages are not read
(CLaRa's prompt has its own system turn and reads documents, not a conversation). The documents it read are in
the answer's `response_metadata["documents"]`; `invoke(..., documents=[...])` reads those texts instead of the
index. Tool calling, structured output and image, audio or PDF input are not CLaRa's: they are refused.
"""

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from .backends import DEFAULT_TIMEOUT_S, ClaraAnswer, GenerationOptions, LocalClara, ReadDocument, RemoteClara


def _backend(index, base_url: str | None, api_key: SecretStr | None, k: int | None, timeout, max_retries: int,
             model_name: str | None = None) -> LocalClara | RemoteClara:
    if (index is None) == (base_url is None):
        raise ValueError("pass either `index` (a ClaraIndex with its model) or `base_url` (a clara serve server)")
    if base_url is not None:
        key = api_key.get_secret_value() if api_key is not None else None
        return RemoteClara(base_url, key, k, timeout or DEFAULT_TIMEOUT_S, max_retries, model_name)
    if index.model is None:
        raise ValueError("the index has no model: ClaraIndex.load(path, model=...) or index.attach_model(model)")
    return LocalClara(index.model, index, k, model_name)


class ClaraRetriever(BaseRetriever):
    """The top `k` documents of a question by CLaRa's query reasoner, from a `ClaraIndex` or a `clara serve`
    server's `/v1/search`. Each `Document` carries `metadata={"id", "score"}` (the cosine score)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any = None
    """A `ClaraIndex` with its model attached."""
    base_url: str | None = None
    """A `clara serve` server, e.g. `http://127.0.0.1:8000`."""
    api_key: SecretStr | None = None
    """The server's `--api-key`, if it has one."""
    k: int = 4
    timeout: float | None = None
    max_retries: int = 2

    _clara: LocalClara | RemoteClara = PrivateAttr()

    @model_validator(mode="after")
    def _connect(self):
        self._clara = _backend(self.index, self.base_url, self.api_key, self.k, self.timeout, self.max_retries)
        return self

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        return [_document(hit) for hit in self._clara.search(query, k or self.k)]


def _document(hit: ReadDocument) -> Document:
    return Document(page_content=hit.text, metadata={"id": hit.id, "score": hit.score})


class ChatClara(BaseChatModel):
    """A chat model that answers the last human message from CLaRa memory: the top `k` documents of a `ClaraIndex`
    (or the `documents` passed to `invoke`), compressed, read by the generator. Over a `clara serve` server with
    `base_url` (its OpenAI-compatible `/v1/chat/completions`).

    `temperature` 0 is greedy; `max_tokens`, `top_p`, `seed` and `stop` as OpenAI's. The answer's
    `response_metadata` holds `documents` (`id`, `score`, `text` of each document read), `finish_reason` and
    `model_name`; `usage_metadata` counts the generator's prompt (memory slots included) and the answer's tokens.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    index: Any = None
    """A `ClaraIndex` with its model attached."""
    base_url: str | None = None
    """A `clara serve` server, e.g. `http://127.0.0.1:8000`."""
    api_key: SecretStr | None = None
    model_name: str | None = Field(default=None, alias="model")
    """Reported in traces; a server's `--served-model-name`. Default: the model's name."""
    k: int | None = None
    """Documents read per answer; default the model's `generation_top_k`."""
    temperature: float = 0.0
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    max_retries: int = 2
    streaming: bool = False
    """`invoke` streams internally (callbacks receive each token)."""

    _clara: LocalClara | RemoteClara = PrivateAttr()

    @model_validator(mode="after")
    def _connect(self):
        self._clara = _backend(self.index, self.base_url, self.api_key, self.k, self.timeout, self.max_retries,
                               self.model_name)
        self.model_name = self.model_name or self._clara.model_name or "clara"
        return self

    @property
    def _llm_type(self) -> str:
        return "clara"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "base_url": self.base_url, "k": self.k, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(ls_provider="clara", ls_model_name=kwargs.get("model") or self.model_name,
                      ls_temperature=self.temperature)
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _options(self, stop: list[str] | None) -> GenerationOptions:
        return GenerationOptions(self.max_tokens, self.temperature, self.top_p, self.seed, list(stop or self.stop or []))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        answer = self._clara.answer(_question(messages), self._options(stop), **_call_options(kwargs))
        usage, metadata = _usage_and_metadata(answer)
        message = AIMessage(content=answer.text, usage_metadata=usage, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for piece in self._clara.stream(_question(messages), self._options(stop), **_call_options(kwargs)):
            if isinstance(piece, ClaraAnswer):  # the last chunk: no text, the usage and the documents read
                usage, metadata = _usage_and_metadata(piece)
                yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage,
                                                                 response_metadata=metadata, chunk_position="last"))
                return
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk


def _call_options(kwargs: dict) -> dict:
    """`documents` and `k` of one call; `model` (a name for traces) and the rest LangChain passes are not CLaRa's."""
    return {name: kwargs[name] for name in ("documents", "k") if kwargs.get(name) is not None}


def _usage_and_metadata(answer: ClaraAnswer) -> tuple[UsageMetadata, dict]:
    usage = UsageMetadata(input_tokens=answer.prompt_tokens, output_tokens=answer.completion_tokens,
                          total_tokens=answer.prompt_tokens + answer.completion_tokens)
    metadata = {"model_name": answer.model, "finish_reason": answer.finish_reason,
                "documents": [{"id": d.id, "score": d.score, "text": d.text} for d in answer.documents]}
    return usage, metadata


def _question(messages: list[BaseMessage]) -> str:
    """The text of the last human message, the question CLaRa answers."""
    human = [m for m in messages if isinstance(m, HumanMessage)]
    if not human:
        raise ValueError("ChatClara answers the last human message; the messages hold none")
    content = human[-1].content
    if not isinstance(content, str):
        kinds = {block.get("type") for block in content if isinstance(block, dict)} - {"text"}
        if kinds:
            raise ValueError(f"ChatClara reads text only; the last human message holds {sorted(kinds)} content")
    question = human[-1].text
    if not question.strip():
        raise ValueError("the last human message has no text")
    return question


__all__ = ["ChatClara", "ClaraRetriever"]
