"""OpenAI-compatible endpoints of `clara serve`, for OpenAI clients, chat UIs and LangChain's / LlamaIndex's OpenAI
classes:

    GET  /v1/models              the served model (`--served-model-name`)
    POST /v1/chat/completions    OpenAI's chat completion, answered from CLaRa memory; `stream: true` for SSE

The question is the last user message; earlier turns and system messages are not read (CLaRa's prompt has its own
system turn and reads documents, not a conversation). The documents are the index's top `k`, or the request's
`documents` (an extension field: OpenAI clients send it with `extra_body`), compressed and read as `/v1/answer`
reads them. The response adds a top-level `documents` list (`id`, `score`, `text` of each document read); a stream
sends it in its first chunk. What CLaRa cannot honour (`n` > 1, tools, images, logprobs, JSON output, penalties) is
a 400 naming the field, in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

How requests run:
- Greedy (`temperature` 0), not streamed, without `stop`, `top_p` or `seed`: the `chat` queue, batched (one
  `generate` call per batch, which also counts each answer's tokens); the answers are /v1/answer's. A batch stops
  at its next token once none of its requests is still waited for (each timed out or its client left).
- Streamed or sampled: the `stream` queue, one request per model call on the same model thread (a streamer reads one
  sequence; `generate` samples per call). Its text is sent as it is generated. A client that leaves, or a request
  past `--request-timeout`, stops its generation at the next token.
Documents given in a request are compressed on the `compress` queue, in chunks, as /v1/answer's. Queue bounds (503 +
Retry-After), timeouts (504), the per-request limits and `/metrics` apply to every queue.
"""

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging

from ..integrations.backends import CountingStreamer, GenerationOptions, VisibleText
from .batching import DynamicBatcher, QueueFullError, RequestTimeoutError
from .engine import AnswerRequest, ClaraServingEngine, Hit
from .settings import ServeSettings

logger = logging.get_logger(__name__)

OPENAI_ENDPOINTS = ("/v1/models", "/v1/chat/completions")
MAX_STOP_STRINGS = 4  # as OpenAI


# ----------------------------------------------------------------------------------------------------------------
# Request and response bodies


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field (`documnets`) is an error, not silently ignored


class TextPart(_OpenAIBody):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict] | None = None
    name: StrictStr | None = None


class StreamOptions(_OpenAIBody):
    include_usage: StrictBool = False


class ChatCompletionRequest(_OpenAIBody):
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    # OpenAI's bookkeeping fields: accepted, no effect on the answer
    user: StrictStr | None = None
    metadata: dict | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    # CLaRa's extensions (OpenAI clients: `extra_body={"documents": [...], "k": 2}`)
    documents: list[Annotated[StrictStr, Field(min_length=1)]] | None = Field(None, min_length=1)
    k: StrictInt | None = Field(None, ge=1, le=100)
    # OpenAI's options CLaRa cannot honour: accepted only at their neutral values, refused otherwise
    tools: list | None = None
    tool_choice: object = None
    functions: list | None = None
    function_call: object = None
    response_format: dict | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    logit_bias: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    parallel_tool_calls: StrictBool | None = None
    modalities: list[StrictStr] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: StrictStr | None = None
    web_search_options: dict | None = None

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def is_plain_greedy(self) -> bool:
        """Answerable by the batched greedy path (`/v1/answer`'s)."""
        return not self.stream and not self.temperature and not self.stop_strings and self.top_p is None and \
            self.seed is None


class OpenAIError(Exception):
    """A client mistake or refusal, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request",
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """What CLaRa cannot do, named by its field."""
    refused = {
        "n": body.n not in (None, 1),
        "tools": bool(body.tools), "functions": bool(body.functions),
        "tool_choice": body.tool_choice not in (None, "none"), "function_call": body.function_call not in (None, "none"),
        "parallel_tool_calls": bool(body.parallel_tool_calls),
        "response_format": body.response_format is not None and body.response_format.get("type") != "text",
        "logprobs": bool(body.logprobs), "top_logprobs": bool(body.top_logprobs), "logit_bias": bool(body.logit_bias),
        "frequency_penalty": bool(body.frequency_penalty), "presence_penalty": bool(body.presence_penalty),
        "modalities": body.modalities not in (None, ["text"]), "audio": body.audio is not None,
        "prediction": body.prediction is not None, "reasoning_effort": body.reasoning_effort is not None,
        "web_search_options": body.web_search_options is not None,
    }
    for name, is_refused in refused.items():
        if is_refused:
            raise OpenAIError(400, f"`{name}` is not supported by CLaRa (one text answer per request, read from "
                              "document memory)", name, "unsupported_parameter")
    if len(body.stop_strings) > MAX_STOP_STRINGS or not all(body.stop_strings):
        raise OpenAIError(400, f"`stop` takes 1 to {MAX_STOP_STRINGS} non-empty strings", "stop")


def _question(messages: list[ChatMessage]) -> str:
    """The text of the last user message."""
    position = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    if position is None:
        raise OpenAIError(400, "the messages hold no user message: CLaRa answers the last one", "messages")
    content = messages[position].content
    if isinstance(content, list):
        texts = []
        for part in content:
            try:
                texts.append(TextPart.model_validate(part).text)
            except ValidationError:
                kind = str(part.get("type"))[:40]
                raise OpenAIError(400, f"CLaRa reads text only; messages[{position}] holds a {kind!r} part",
                                  f"messages[{position}].content") from None
        content = "\n".join(texts)
    if not content or not content.strip():
        raise OpenAIError(400, f"messages[{position}] (the last user message) has no text",
                          f"messages[{position}].content")
    return content


def _parse(raw: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body is not valid JSON", "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object", "body")
    unknown = next((key for key in data if key not in ChatCompletionRequest.model_fields), None)
    if unknown is not None:  # the first unknown key names the mistake, before validating anything else
        raise OpenAIError(400, f"unknown field {unknown[:60]!r}", unknown[:60], "unknown_parameter")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"])[:60] or "body"
        raise OpenAIError(400, f"{param}: {first['msg']}", param) from None


# ----------------------------------------------------------------------------------------------------------------
# A streamed or sampled generation on the model thread


class _QueueStreamer(CountingStreamer):
    """Hands the text of each token from the model thread to the event loop; counts the tokens generated."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        super().__init__(tokenizer)
        self.loop, self.events = loop, events

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", text))


class _TokenCounts(BaseStreamer):
    """Counts each row's generated tokens up to and including its end token, for a batched `generate` call."""

    def __init__(self, n_rows: int, end_ids: list[int]):
        self.counts, self.ended, self.end_ids, self.is_prompt = [0] * n_rows, [False] * n_rows, set(end_ids), True

    def put(self, value: torch.Tensor):
        if self.is_prompt:  # generate's first call: the prompt
            self.is_prompt = False
            return
        for row, token in enumerate(value.reshape(len(self.counts), -1)[:, -1].tolist()):
            if not self.ended[row]:
                self.counts[row] += 1
                self.ended[row] = token in self.end_ids

    def end(self):
        pass


@dataclass
class _ChatJob:
    question: str
    k: int
    max_new_tokens: int
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    memory: torch.Tensor | None = None  # the request's documents, compressed beforehand; None: from the index
    documents: list[str] | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class _ChatOutcome:
    completion_tokens: int
    ended: bool  # the generator ended the answer (an end token), rather than running into max_new_tokens
    text: str = ""  # a batched answer's text (a stream's text goes through its events)
    hits: list[Hit] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# The router


def openai_router(engine: ClaraServingEngine, settings: ServeSettings, executor, metrics,
                  batchers: dict[str, DynamicBatcher]) -> APIRouter:
    """The OpenAI-compatible endpoints of a `clara serve` app.

    Args:
        executor: The model's single-thread executor, where the `chat` and `stream` queues run their model calls.
        metrics: The app's `ServingMetrics`.
        batchers: The app's queues by operation: given documents go through its `compress` queue; the `chat` and
            `stream` queues are added to it, so that the app starts, stops and reports them with its own.
    """
    model = engine.model
    # Token counts on the event loop; the model thread has its own tokenizer (a fast tokenizer is not shared).
    processor = copy.deepcopy(model.processor)
    prompt_start = {}

    def choose(job: _ChatJob) -> tuple[torch.Tensor, list[Hit]]:
        """The memory a request reads and its hits: the index's top k, or `model.select_documents`' choice among
        the request's documents (the rule of /v1/answer)."""
        if job.memory is None:
            result = engine.index.search([job.question], k=job.k)[0]
            hits = [Hit(i, s, t) for i, s, t in zip(result.ids, result.scores, result.texts)]
            return engine.index.embeddings(result.positions), hits
        memories, indices, scores = model.select_documents([job.question], [job.memory], k=job.k)
        scores = scores[0] or [None] * len(indices[0])
        return memories[0], [Hit(str(j), s, job.documents[j]) for j, s in zip(indices[0], scores)]

    def shared_prompt_start():
        if "cache" not in prompt_start:
            prompt_start["cache"] = model.cache_prompt_start()
        return prompt_start["cache"]

    def run_chats(jobs: list[_ChatJob], should_stop) -> list[_ChatOutcome]:
        """On the model thread: greedy answers of a batch in one generate call, each one's tokens counted; it ends
        early once `should_stop()` (no request of the batch is waited for)."""
        chosen = [choose(job) for job in jobs]
        counts = _TokenCounts(len(jobs), model.tokenizer.all_special_ids)
        texts = model.generate_from_memory([job.question for job in jobs], [memory for memory, _ in chosen],
                                           max_new_tokens=jobs[0].max_new_tokens, prompt_start=shared_prompt_start(),
                                           should_stop=should_stop, streamer=counts)
        return [_ChatOutcome(n, ended, text, hits) for n, ended, text, (_, hits) in
                zip(counts.counts, counts.ended, texts, chosen)]

    def run_streams(jobs: list[_ChatJob]) -> list[_ChatOutcome]:
        return [run_stream(job) for job in jobs]

    def run_stream(job: _ChatJob) -> _ChatOutcome:
        """On the model thread: choose the documents, send them, then generate with the text streamed."""
        memory, hits = choose(job)
        job.send("documents", hits)
        streamer = _QueueStreamer(model.tokenizer, job.loop, job.events)
        if job.options.seed is not None:
            torch.manual_seed(job.options.seed)
        model.generate_from_memory(
            [job.question], [memory], max_new_tokens=job.max_new_tokens, prompt_start=shared_prompt_start(),
            streamer=streamer, should_stop=job.cancel.is_set,
            **job.options.generate_kwargs(model.tokenizer),
        )
        ended = streamer.last_token in model.tokenizer.all_special_ids
        return _ChatOutcome(streamer.n_tokens, ended)

    # One sequence per call: a streamer follows one sequence, and sampling options are per `generate` call.
    stream_batcher = DynamicBatcher("stream", run_streams, executor, 1, settings.max_wait_ms / 1000,
                                    settings.max_queue, on_batch=metrics.batch_done)
    # Greedy whole answers batch like /v1/answer's, in their own queue: the generate call also counts each
    # answer's tokens (usage, finish_reason), which /v1/answer does not report.
    chat_batcher = DynamicBatcher("chat", run_chats, executor, settings.max_batch_size, settings.max_wait_ms / 1000,
                                  settings.max_queue, on_batch=metrics.batch_done, stoppable=True,
                                  on_stopped=metrics.batch_stopped)
    batchers.update(stream=stream_batcher, chat=chat_batcher)
    for each in (stream_batcher, chat_batcher):
        metrics.watch_queue(each)

    router = APIRouter()

    def prompt_tokens(question: str, n_docs: int) -> int:
        return len(processor.prompt_ids([processor.build_prompt(n_docs, task="answer", question=question)[0]])[0])

    def check(body: ChatCompletionRequest) -> AnswerRequest:
        """Every check that needs no model work, in OpenAI's terms."""
        _refuse_unsupported(body)
        if body.model != settings.model_name:
            raise OpenAIError(404, f"the model {body.model[:80]!r} is not served here; this server serves "
                              f"{settings.model_name!r} (GET /v1/models)", "model", "model_not_found")
        question = _question(body.messages)
        limit = settings.max_new_tokens
        if body.new_tokens is not None and body.new_tokens > limit:
            name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise OpenAIError(400, f"{name}={body.new_tokens}; this server generates at most {limit} tokens per "
                              "answer (--max-new-tokens)", name, "limit_exceeded")
        if body.documents is not None and len(body.documents) > settings.max_documents:
            raise OpenAIError(400, f"{len(body.documents)} documents; this server compresses at most "
                              f"{settings.max_documents} per request (--max-documents)", "documents", "limit_exceeded")
        request = AnswerRequest(question, body.documents, body.k or model.config.generation_top_k,
                                body.new_tokens or min(model.config.max_new_tokens, limit))
        if (problem := engine.answer_problem(request) or engine.prompt_problem(request)) is not None:
            raise OpenAIError(400, str(problem), _param(problem.field), "unanswerable")
        return request

    def completion_id() -> str:
        return f"chatcmpl-{uuid.uuid4().hex}"

    def usage(question: str, n_docs: int, completion_tokens: int) -> dict:
        prompt = prompt_tokens(question, n_docs)
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def rejected(operation: str, error: Exception) -> OpenAIError:
        """A queue or time refusal, counted, in OpenAI's shape."""
        if isinstance(error, QueueFullError):
            metrics.rejected.labels(operation, "queue_full").inc()
            return OpenAIError(503, str(error), None, "queue_full", "server_busy",
                               headers={"Retry-After": str(error.retry_after)})
        metrics.rejected.labels(operation, "timeout").inc()
        return OpenAIError(504, f"--request-timeout ({settings.request_timeout_s:g} s) passed: {error}", None,
                           "timeout", "timeout")

    async def memory_of(request: AnswerRequest, until: float) -> torch.Tensor | None:
        """The request's documents compressed as /v1/answer compresses them: chunks of --max-batch-documents on the
        `compress` queue, no further chunk once the request has timed out or its client has left."""
        if request.documents is None:
            return None
        chunk, parts = settings.max_batch_documents, []
        for start in range(0, len(request.documents), chunk):
            part = request.documents[start : start + chunk]
            parts.append(await batchers["compress"].submit(part, timeout=max(until - time.monotonic(), 0),
                                                           cost=len(part)))
        return torch.cat(parts)

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "clara-hf"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = _parse(await request.body())
            answer_request = check(body)
        except OpenAIError as error:
            return error.response()
        options = GenerationOptions(answer_request.max_new_tokens, body.temperature or 0.0, body.top_p, body.seed,
                                    body.stop_strings)
        job = _ChatJob(answer_request.question, answer_request.k, answer_request.max_new_tokens, options,
                         asyncio.get_running_loop(), documents=answer_request.documents)
        if body.is_plain_greedy:
            return await _until_disconnect(request, batched(job, answer_request), metrics, "chat")
        if body.stream:
            return await streamed(request, body, job, answer_request)
        return await _until_disconnect(request, sampled(body, job, answer_request), metrics, "stream")

    async def batched(job: _ChatJob, answer_request: AnswerRequest) -> JSONResponse:
        """Greedy and whole: the `chat` queue, batched with other such requests (one generate call)."""
        until = time.monotonic() + settings.request_timeout_s
        try:
            job.memory = await memory_of(answer_request, until)
            outcome = await chat_batcher.submit(job, key=job.max_new_tokens, timeout=max(until - time.monotonic(), 0))
        except (QueueFullError, RequestTimeoutError) as error:
            return rejected("chat", error).response()
        return JSONResponse(_completion(completion_id(), settings.model_name, outcome.text,
                                        _finish_reason(outcome, job.max_new_tokens, False),
                                        usage(job.question, len(outcome.hits), outcome.completion_tokens), outcome.hits))

    async def run(job: _ChatJob, answer_request: AnswerRequest) -> asyncio.Task:
        """Compress the given documents, then queue the generation; the task resolves when it has ended."""
        until = time.monotonic() + settings.request_timeout_s
        job.memory = await memory_of(answer_request, until)
        return asyncio.ensure_future(stream_batcher.submit(job, key=id(job), timeout=max(until - time.monotonic(), 0)))

    async def sampled(body: ChatCompletionRequest, job: _ChatJob, answer_request: AnswerRequest) -> JSONResponse:
        """Sampled or with stop strings, whole: the `stream` queue, its text gathered."""
        try:
            task = await run(job, answer_request)
        except (QueueFullError, RequestTimeoutError) as error:
            return rejected("compress", error).response()
        visible, hits = VisibleText(body.stop_strings), []
        try:
            outcome = await task
        except (QueueFullError, RequestTimeoutError) as error:
            return rejected("stream", error).response()
        finally:
            job.cancel.set()
        while not job.events.empty():
            kind, value = job.events.get_nowait()
            if kind == "documents":
                hits = value
            else:
                visible.add(value)
        visible.add("", final=True)
        reason = _finish_reason(outcome, job.max_new_tokens, visible.stopped)
        return JSONResponse(_completion(completion_id(), settings.model_name, visible.text, reason,
                                        usage(job.question, len(hits), outcome.completion_tokens), hits))

    async def streamed(request: Request, body: ChatCompletionRequest, job: _ChatJob,
                       answer_request: AnswerRequest):
        """Server-sent events: the documents in the first chunk, the text as generated, [DONE]."""
        try:
            task = await run(job, answer_request)
        except (QueueFullError, RequestTimeoutError) as error:
            return rejected("compress", error).response()
        # Wait for the documents (the generation has started) or a refusal, so that a refusal keeps its status.
        first = asyncio.ensure_future(job.events.get())
        await asyncio.wait({first, task}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            try:
                task.result()
            except (QueueFullError, RequestTimeoutError) as error:
                return rejected("stream", error).response()
        identifier, created = completion_id(), int(time.time())

        def chunk(delta: dict | None, reason: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
            payload = {"id": identifier, "object": "chat.completion.chunk", "created": created,
                       "model": settings.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            visible, hits = VisibleText(body.stop_strings), []

            def to_chunk(kind: str, value) -> str | None:
                nonlocal hits
                if kind == "documents":
                    hits = value
                    return chunk({"role": "assistant", "content": ""}, documents=[_hit_json(h) for h in hits])
                new = visible.add(value)
                return chunk({"content": new}) if new else None

            pending = first
            try:
                while True:
                    await asyncio.wait({pending, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not pending.done():  # the generation has ended: what it sent is queued
                        pending.cancel()
                        break
                    if (text := to_chunk(*pending.result())) is not None:
                        yield text
                    pending = asyncio.ensure_future(job.events.get())
                while not job.events.empty():
                    if (text := to_chunk(*job.events.get_nowait())) is not None:
                        yield text
                try:
                    outcome = task.result()
                except (QueueFullError, RequestTimeoutError) as error:
                    yield _error_event(rejected("stream", error))
                    return
                except Exception as error:
                    logger.error(f"a streamed chat completion failed: {error!r}")
                    yield _error_event(OpenAIError(500, "the server failed on this request", None, "server_error",
                                                   "server_error"))
                    return
                if new := visible.add("", final=True):
                    yield chunk({"content": new})
                yield chunk({}, _finish_reason(outcome, job.max_new_tokens, visible.stopped))
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk(None, usage=usage(job.question, len(hits), outcome.completion_tokens))
                yield "data: [DONE]\n\n"
            finally:  # also when the client left: Starlette cancels this generator
                job.cancel.set()
                if not task.done():
                    task.cancel()
                    metrics.rejected.labels("stream", "disconnected").inc()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return router


def _finish_reason(outcome: _ChatOutcome, max_new_tokens: int, stopped: bool) -> str:
    return "length" if outcome.completion_tokens >= max_new_tokens and not (stopped or outcome.ended) else "stop"


def _param(field: str | None) -> str | None:
    # The engine names /v1/answer's fields; a chat completion's question is its last user message.
    return "messages" if field == "question" else field


def _hit_json(hit: Hit) -> dict:
    return {"id": hit.id, "score": hit.score, "text": hit.text}


def _completion(identifier: str, model_name: str, text: str, reason: str, usage: dict, hits: list[Hit]) -> dict:
    return {"id": identifier, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage, "documents": [_hit_json(h) for h in hits]}


def _error_event(error: OpenAIError) -> str:
    """An error after the stream has started, as OpenAI sends one: a data event holding `error`."""
    body = {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}}
    return f"data: {json.dumps(body)}\n\n"


async def _until_disconnect(request: Request, work, metrics, operation: str) -> JSONResponse:
    """Await `work` until it is done or the client leaves (then its queued work is dropped)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        metrics.rejected.labels(operation, "disconnected").inc()
        return OpenAIError(499, "the client closed the connection", None, "client_closed").response()
    return task.result()


__all__ = ["ChatCompletionRequest", "OPENAI_ENDPOINTS", "openai_router"]
