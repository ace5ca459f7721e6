"""The HTTP application of `clara serve`: endpoints, request limits, errors, Prometheus metrics, and the uvicorn
server that runs it.

    GET  /health        liveness: {"status": "ok", "model", "backend", "index_documents", "queue_depth"}
    GET  /ready         readiness: 200 {"status": "ready"}, or 503 while a queue is full or the model is stuck
    POST /v1/search     {"question", "k"}                                   -> {"documents": [{"id", "score", "text"}]}
    POST /v1/answer     {"question", "documents"?, "k"?, "max_new_tokens"?} -> {"answer", "documents": [...]}
    POST /v1/compress   {"documents"}                    -> {"memory": base64 safetensors, "shape", "dtype"}
    GET  /metrics       Prometheus text format
    GET  /v1/models, POST /v1/chat/completions   OpenAI-compatible (serving/openai_api.py)

Every error is `{"error": {"field", "message", "type"}}`: client mistakes are 4xx naming the field, a request over
a limit names the option that sets it, a full queue is 503 with `Retry-After`, a request that times out is 504.
Work per request and per model call is bounded (see `ServeSettings`); a request whose client leaves or times out
stops costing model time at the next model call (compression runs in chunks of `max_batch_documents`), and a
generating batch stops at its next token once none of its requests is still waited for.
"""

import asyncio
import base64
import functools
import hmac
import json
import time
import unicodedata
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

import h11
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from safetensors.torch import save as save_safetensors
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from transformers.utils import logging
from uvicorn.protocols.http.h11_impl import H11Protocol

from .batching import DynamicBatcher, QueueFullError, RequestTimeoutError
from .engine import AnswerRequest, ClaraServingEngine, Hit, RequestError, SearchRequest
from .openai_api import OPENAI_ENDPOINTS, openai_router
from .settings import MAX_DOCUMENTS, ServeSettings

logger = logging.get_logger(__name__)

# Bounds the request schema enforces on every server; the per-server limits are `ServeSettings`.
MAX_K = 100
MAX_TEXT_CHARS = 20_000
ENDPOINTS = ("/health", "/ready", "/metrics", "/v1/search", "/v1/answer", "/v1/compress", *OPENAI_ENDPOINTS)
OPEN_ENDPOINTS = ("/health",)  # answered without the API key: liveness probes carry no secrets
CLIENT_CLOSED = "499"  # nginx's status for a request whose client closed the connection before its response
FIELD_CHARS = 60  # a field name echoed in an error is cut here (unknown keys can be any length)


# ----------------------------------------------------------------------------------------------------------------
# Request bodies


def _visible(text: str) -> str:
    # Zero-width and other format characters (category Cf) are as empty as whitespace (Z*) and controls (Cc).
    if not any(unicodedata.category(char)[0] not in "ZC" for char in text):
        raise ValueError("must hold a visible character (not only whitespace, control or zero-width characters)")
    return text


Text = Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_visible)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    @model_validator(mode="before")
    @classmethod
    def _keep_one_unknown_field(cls, data):
        """Every unknown key would become a validation error of its own (80k keys: most of a second); the first
        one names the mistake."""
        if isinstance(data, dict):
            unknown = next((key for key in data if key not in cls.model_fields), None)
            if unknown is not None:
                return {key: value for key, value in data.items() if key in cls.model_fields} | {unknown: data[unknown]}
        return data


class SearchBody(_Body):
    question: Text
    k: StrictInt = Field(10, ge=1, le=MAX_K)


class AnswerBody(_Body):
    question: Text
    documents: list[Text] | None = Field(None, min_length=1, max_length=MAX_DOCUMENTS)
    k: StrictInt | None = Field(None, ge=1, le=MAX_K)
    max_new_tokens: StrictInt | None = Field(None, ge=1)


class CompressBody(_Body):
    documents: list[Text] = Field(min_length=1, max_length=MAX_DOCUMENTS)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class ServingMetrics:
    """Prometheus metrics of one server, in their own registry (several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("clara_requests_total", f"HTTP requests by endpoint and status code ({CLIENT_CLOSED}: "
                                "the client left before its response)", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("clara_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.batch_size = Histogram("clara_batch_size", "requests per batched model call", ["operation"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("clara_batch_duration_seconds", "model time of one batched call (without the "
                                       "wait for the model thread)", ["operation"],
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.queue_depth = Gauge("clara_queue_depth", "requests waiting for the model thread", ["operation"],
                                 registry=self.registry)
        self.rejected = Counter("clara_requests_rejected_total", "requests refused (queue_full) or dropped (timeout, "
                                "disconnected: the client left)", ["operation", "reason"], registry=self.registry)
        self.stopped = Counter("clara_batches_stopped_total", "batched model calls stopped before their end: none of "
                               "their requests was still waited for", ["operation"], registry=self.registry)

    def batch_done(self, operation: str, size: int, seconds: float) -> None:
        self.batch_size.labels(operation).observe(size)
        self.batch_seconds.labels(operation).observe(seconds)

    def batch_stopped(self, operation: str) -> None:
        self.stopped.labels(operation).inc()

    def watch_queue(self, batcher: DynamicBatcher) -> None:
        self.queue_depth.labels(batcher.operation).set_function(lambda: batcher.queue_depth)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def error_response(status: int, message: str, field: str | None = None, kind: str = "invalid_request",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message, "type": kind}}, status_code=status, headers=headers)


def _error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"field": None, "message": message, "type": kind}}).encode()


def _validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"] if part != "body"]
    field = ".".join(location)[:FIELD_CHARS] or "body"
    if error["type"] == "json_invalid":
        return error_response(400, f"invalid JSON: {error.get('ctx', {}).get('error', error['msg'])}", "body", "invalid_json")
    if error["type"] == "missing" and not location:
        return error_response(400, "the request needs a JSON object body", "body", "missing_body")
    if error["type"] == "extra_forbidden":
        return error_response(422, f"unknown field {field!r}", field, error["type"])
    return error_response(422, f"{field}: {error['msg']}", field, error["type"])


def _http_error_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (no route, wrong method, an unreadable body) in the API's shape."""
    path = request.url.path[:FIELD_CHARS]
    if exc.status_code == 404:
        return error_response(404, f"no endpoint {path!r}; the endpoints are {', '.join(ENDPOINTS)}", kind="not_found")
    if exc.status_code == 405:
        return error_response(405, f"{request.method} is not allowed on {path!r}", kind="method_not_allowed",
                              headers=exc.headers)
    if exc.status_code == 400:  # FastAPI could not parse the body: invalid UTF-8, nesting too deep, huge numbers
        return error_response(400, "the body is not JSON this server can read (invalid UTF-8, nesting too deep or a "
                              "number too large)", "body", "invalid_json")
    return error_response(exc.status_code, str(exc.detail), kind="http_error", headers=exc.headers)


def _server_error_response(request: Request, exc: Exception) -> JSONResponse:
    logger.error(f"{request.method} {request.url.path} failed: {exc!r}")
    return error_response(500, "the server failed on this request", kind="server_error")


# ----------------------------------------------------------------------------------------------------------------
# ASGI middleware (outermost first: metrics, hosts, key, body)


class RequestMetrics:
    """Count every request by endpoint and status: a 5xx the app raised too, and `CLIENT_CLOSED` for a client that
    left before its response."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), None

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = status or "500"  # Starlette's outermost middleware answers it with our 500 handler
            raise
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
            self.metrics.requests.labels(endpoint, status or CLIENT_CLOSED).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)


class TrustedHosts:
    """Starlette's `TrustedHostMiddleware` check (a forged Host, as DNS rebinding sends, is refused), answered in
    the API's error shape and without its www. redirect."""

    def __init__(self, app, allowed_hosts: list[str]):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        admitted = False

        async def admit(scope, receive, _):
            nonlocal admitted
            admitted = True
            await self.app(scope, receive, send)

        async def drop(message):  # Starlette's plain-text refusal; ours follows
            pass

        await TrustedHostMiddleware(admit, self.allowed_hosts, www_redirect=False)(scope, receive, drop)
        if not admitted:
            host = Headers(scope=scope).get("host", "")
            await error_response(400, f"this server does not answer to the Host {host[:FIELD_CHARS]!r} "
                                 "(--allowed-hosts)", "host", "invalid_host")(scope, receive, send)


class ApiKeyCheck:
    """Every endpoint but liveness needs `Authorization: Bearer <key>`, as OpenAI clients send it."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_ENDPOINTS:
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        # Headers arrive decoded as latin-1: encoding back gives the bytes sent. compare_digest: no timing hint.
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        await error_response(401, "a missing or wrong API key: send `Authorization: Bearer <key>`", "authorization",
                             "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimits:
    """The body is read in full before the application runs: over `max_bytes` it is a 413 before it is read into
    memory; not complete within `timeout_s` of the headers, a 408. Both close the connection."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(413, f"the request body is larger than {self.max_bytes} bytes (--max-body-bytes)",
                                      "body_too_large", scope, receive, send)
        deadline = time.monotonic() + self.timeout_s
        chunks, size, more = [], 0, True
        while more:  # a chunked body has no content-length: count as it arrives
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                return await self._refuse(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                          "(--body-timeout)", "body_timeout", scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(413, f"the request body is larger than {self.max_bytes} bytes "
                                          "(--max-body-bytes)", "body_too_large", scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(status, message, kind, scope, receive, send):
        # The rest of the body is never read: close the connection instead of parsing it as the next request.
        await error_response(status, message, "body", kind, headers={"Connection": "close"})(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------------
# The application


class _RequestTimedOut(Exception):
    """A request had no result within --request-timeout; the message says how far its work went."""


async def _until_disconnected(receive) -> None:
    # The body is read: the next message is the disconnect (uvicorn also sends it once the response is out).
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(engine: ClaraServingEngine, settings: ServeSettings, backend: str = "transformers") -> FastAPI:
    """The FastAPI app serving `engine`; batchers start with the app and stop with it."""
    metrics = ServingMetrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clara-model")  # the model is not thread-safe

    def batcher(name, run, max_batch_cost=None, stoppable=False):
        return DynamicBatcher(name, run, executor, settings.max_batch_size, settings.max_wait_ms / 1000,
                              settings.max_queue, max_batch_cost=max_batch_cost, on_batch=metrics.batch_done,
                              stoppable=stoppable, on_stopped=metrics.batch_stopped)

    # A compress call holds at most max_batch_documents documents: compress requests and the documents of answer
    # requests are compressed in chunks of that many, so answer batches only select, retrieve and generate; their
    # generation stops at the next token once none of the batch's requests is waited for.
    batchers = {"compress": batcher("compress", engine.compress_batch, settings.max_batch_documents),
                "search": batcher("search", engine.search_batch),
                "answer": batcher("answer", engine.answer_batch, stoppable=True)}
    for each in batchers.values():
        metrics.watch_queue(each)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for each in batchers.values():
            each.start()
        yield
        for each in batchers.values():
            await each.stop()
        executor.shutdown(wait=True, cancel_futures=True)  # waits for the model call running, one chunk at most
        engine.generator.close()

    # No slash redirects: a redirect names the Host the client sent, which may be anyone's.
    app = FastAPI(title="CLaRa", lifespan=lifespan, redirect_slashes=False)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(Exception, _server_error_response)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key:
        app.add_middleware(ApiKeyCheck, api_key=settings.api_key)
    if "*" not in settings.allowed_hosts:
        app.add_middleware(TrustedHosts, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, sees every response

    def deadline() -> float:
        return time.monotonic() + settings.request_timeout_s

    async def submit(operation: str, item, until: float, key=None, cost: int = 1):
        return await batchers[operation].submit(item, key=key, timeout=max(until - time.monotonic(), 0), cost=cost)

    async def respond(request: Request, operation: str, work: Awaitable):
        """Await `work` (which submits to batchers) until it is done or the client leaves; errors become responses,
        counted under the request's `operation` (an answer's documents queue for compression first).

        A client that leaves cancels `work`: its requests leave their queues, or are skipped by the model thread."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_until_disconnected(request.receive))
        shutting_down = False
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            shutting_down = True  # uvicorn cancels what still runs --shutdown-timeout after SIGTERM
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if shutting_down:
            return error_response(503, "the server is shutting down", kind="shutting_down",
                                  headers={"Connection": "close"})
        if task.cancelled():
            metrics.rejected.labels(operation, "disconnected").inc()
            return error_response(int(CLIENT_CLOSED), "the client closed the connection", kind="client_closed")
        try:
            return task.result()
        except QueueFullError as error:
            metrics.rejected.labels(operation, "queue_full").inc()
            return error_response(503, str(error), kind="queue_full", headers={"Retry-After": str(error.retry_after)})
        except (RequestTimeoutError, _RequestTimedOut) as error:
            metrics.rejected.labels(operation, "timeout").inc()
            message = str(error) if isinstance(error, _RequestTimedOut) else \
                f"--request-timeout ({settings.request_timeout_s:g} s) passed: {error}"
            return error_response(504, message, kind="timeout")
        except RequestError as error:
            return error_response(error.status, str(error), error.field)

    def over_limit(field: str, message: str) -> JSONResponse:
        return error_response(422, message, field, "limit_exceeded")

    def documents_problem(documents: list[str] | None) -> JSONResponse | None:
        if documents is not None and len(documents) > settings.max_documents:
            return over_limit("documents", f"{len(documents)} documents; this server compresses at most "
                              f"{settings.max_documents} per request (--max-documents)")
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "backend": backend,
                "index_documents": None if engine.index is None else len(engine.index),
                "queue_depth": {name: b.queue_depth for name, b in batchers.items()}}

    @app.get("/ready")
    async def ready():
        problems = [f"the {name} queue is full ({b.queue_depth} of --max-queue {settings.max_queue})"
                    for name, b in batchers.items() if b.is_full]
        problems += [f"one {name} model call has run for {b.busy_seconds:.0f} s, longer than --request-timeout "
                     f"({settings.request_timeout_s:g} s)" for name, b in batchers.items()
                     if b.busy_seconds > settings.request_timeout_s]
        if problems:
            return error_response(503, "not ready: " + "; ".join(problems), kind="not_ready")
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/search")
    async def search(request: Request, body: SearchBody):
        if (problem := engine.search_problem()) is not None:
            return error_response(problem.status, str(problem), problem.field)

        async def work():
            hits = await submit("search", SearchRequest(body.question, body.k), deadline())
            return {"documents": [_hit_json(h) for h in hits]}

        return await respond(request, "search", work())

    async def compress_in_chunks(documents: list[str], until: float) -> torch.Tensor:
        """`(n_docs, n_mem, hidden)`: one compress call per chunk of --max-batch-documents (batched with other
        requests' chunks); a request that times out or whose client leaves stops at the next chunk."""
        chunk, parts = settings.max_batch_documents, []
        for start in range(0, len(documents), chunk):
            part = documents[start : start + chunk]
            try:
                parts.append(await submit("compress", part, until, cost=len(part)))
            except RequestTimeoutError as error:
                raise _RequestTimedOut(
                    f"--request-timeout ({settings.request_timeout_s:g} s) passed with {start} of {len(documents)} "
                    f"documents compressed (chunks of --max-batch-documents {chunk}): {error}; no further chunk "
                    "runs") from error
        return torch.cat(parts)

    @app.post("/v1/answer")
    async def answer(request: Request, body: AnswerBody):
        config = engine.model.config
        if body.max_new_tokens is not None and body.max_new_tokens > settings.max_new_tokens:
            return over_limit("max_new_tokens", f"max_new_tokens={body.max_new_tokens}; this server generates at most "
                              f"{settings.max_new_tokens} tokens per answer (--max-new-tokens)")
        if (refused := documents_problem(body.documents)) is not None:
            return refused
        request_ = AnswerRequest(body.question, body.documents, body.k or config.generation_top_k,
                                 body.max_new_tokens or min(config.max_new_tokens, settings.max_new_tokens))
        # Both known from the request alone: refused before any model work.
        if (problem := engine.answer_problem(request_) or engine.prompt_problem(request_)) is not None:
            return error_response(problem.status, str(problem), problem.field)

        async def work():
            until = deadline()
            if request_.documents is not None:
                request_.memory = await compress_in_chunks(request_.documents, until)
            # One generate call needs one max_new_tokens: requests batch with others that ask for the same.
            result = await submit("answer", request_, until, key=request_.max_new_tokens)
            return {"answer": result.answer, "documents": [_hit_json(h) for h in result.documents]}

        return await respond(request, "answer", work())

    @app.post("/v1/compress")
    async def compress(request: Request, body: CompressBody):
        if (refused := documents_problem(body.documents)) is not None:
            return refused

        async def work():
            memory = await compress_in_chunks(body.documents, deadline())
            payload = save_safetensors({"memory": memory.contiguous()})  # safetensors, never pickle
            return {"memory": base64.b64encode(payload).decode("ascii"), "shape": list(memory.shape),
                    "dtype": str(memory.dtype).removeprefix("torch.")}

        return await respond(request, "compress", work())

    app.include_router(openai_router(engine, settings, executor, metrics, batchers))
    return app


def _hit_json(hit: Hit) -> dict:
    return {"id": hit.id, "score": hit.score, "text": hit.text}


# ----------------------------------------------------------------------------------------------------------------
# The server


class ClaraH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with what it lacks, and its own refusals in the API's error shape.

    - A header read timeout: a connection must deliver a request's headers within `header_timeout` seconds of
      opening (or of its previous response), or it gets a 408 and is closed. (uvicorn's keep-alive timeout only
      starts after a response.)
    - The connection limit (uvicorn's `limit_concurrency` rule: a request is refused while `limit_concurrency`
      connections are open or requests run), answered 503 `server_busy` with Retry-After rather than uvicorn's plain
      text: the app this protocol runs is wrapped, and uvicorn's own limit is left unset.
    - A request h11 cannot parse (headers over `--max-header-bytes`, a malformed request line): 400, closed.
    """

    def __init__(self, *args, header_timeout: float, limit_concurrency: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.limit = header_timeout, limit_concurrency
        self._header_timer: asyncio.TimerHandle | None = None
        self.app = functools.partial(self._run_within_limit, self.app)

    async def _run_within_limit(self, app, scope, receive, send):
        # This request's own task is already counted in `self.tasks` (uvicorn counts it after its check).
        if len(self.connections) >= self.limit or len(self.tasks) > self.limit:
            logger.warning("a request was refused: --limit-concurrency reached")
            refusal = error_response(503, f"the server holds --limit-concurrency ({self.limit}) connections or "
                                     "requests; retry later", kind="server_busy",
                                     headers={"Retry-After": "1", "Connection": "close"})
            return await refusal(scope, receive, send)
        return await app(scope, receive, send)

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._send_and_close(400, b"Bad Request", f"the request could not be read as HTTP/1.1 ({msg.rstrip('.')}): "
                             "malformed, or its request line and headers are over --max-header-bytes",
                             "invalid_request")

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _headers_timed_out(self) -> None:
        between_requests = self.cycle is None or self.cycle.response_complete
        if self.transport.is_closing() or not between_requests or self.conn.their_state is not h11.IDLE:
            return  # a request is being read (its body has --body-timeout) or answered
        self._send_and_close(408, b"Request Timeout", f"no complete request headers within {self.header_timeout:g} s "
                             "(--header-timeout)", "header_timeout")

    def _send_and_close(self, status: int, reason: bytes, message: str, kind: str) -> None:
        """An error in the API's shape, written before any response of the connection's request, then closed."""
        body = _error_body(message, kind)
        try:
            output = self.conn.send(h11.Response(status_code=status, reason=reason, headers=[
                ("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]))
            output += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
            self.transport.write(output)
        except h11.LocalProtocolError:
            pass  # the connection is past where a response can be sent: just close it
        self.transport.close()


def serve(app: FastAPI, settings: ServeSettings, host: str, port: int) -> None:
    """Run `app` with uvicorn under `settings`' connection limits until SIGINT / SIGTERM.

    On shutdown the server stops accepting, waits up to `shutdown_timeout_s` for requests in flight, cancels the
    rest (their model work stops at the next chunk) and exits."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning",
        http=functools.partial(ClaraH11Protocol, header_timeout=settings.header_timeout_s,
                               limit_concurrency=settings.limit_concurrency),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes, timeout_graceful_shutdown=settings.shutdown_timeout_s,
        # X-Forwarded-For / -Proto are believed only from the proxies named (uvicorn believes 127.0.0.1 by default).
        proxy_headers=settings.forwarded_allow_ips is not None, forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    uvicorn.Server(config).run()
