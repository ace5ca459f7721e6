"""The HTTP application of `clara serve`: endpoints, request validation, errors and Prometheus metrics.

    GET  /health        {"status": "ok", "model", "backend", "index_documents", "queue_depth"}
    POST /v1/search     {"question", "k"}                                   -> {"documents": [{"id", "score", "text"}]}
    POST /v1/answer     {"question", "documents"?, "k"?, "max_new_tokens"?} -> {"answer", "documents": [...]}
    POST /v1/compress   {"documents"}                    -> {"memory": base64 safetensors, "shape", "dtype"}
    GET  /metrics       Prometheus text format

Client mistakes are 4xx with `{"error": {"field", "message", "type"}}` naming the field; a full queue is 503 with
`Retry-After`; a request that times out is 504 and leaves the queue.
"""

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr
from safetensors.torch import save as save_safetensors
from transformers.utils import logging

from .batching import DynamicBatcher, QueueFullError
from .engine import AnswerRequest, ClaraServingEngine, Hit, RequestError, SearchRequest

logger = logging.get_logger(__name__)

# Bounds on one request (documented in the README); a request past them is a 422 naming the field.
MAX_K = 100
MAX_NEW_TOKENS = 512
MAX_DOCUMENTS = 64
MAX_TEXT_CHARS = 20_000
DEFAULT_MAX_BODY_BYTES = 1 << 20
ENDPOINTS = ("/health", "/metrics", "/v1/search", "/v1/answer", "/v1/compress")


@dataclass
class ServeSettings:
    """How `clara serve` batches and bounds requests."""

    model_name: str
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    request_timeout_s: float = 60.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


# ----------------------------------------------------------------------------------------------------------------
# Request bodies


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or whitespace-only")
    return text


Text = Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_not_blank)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class SearchBody(_Body):
    question: Text
    k: StrictInt = Field(10, ge=1, le=MAX_K)


class AnswerBody(_Body):
    question: Text
    documents: list[Text] | None = Field(None, min_length=1, max_length=MAX_DOCUMENTS)
    k: StrictInt | None = Field(None, ge=1, le=MAX_K)
    max_new_tokens: StrictInt | None = Field(None, ge=1, le=MAX_NEW_TOKENS)


class CompressBody(_Body):
    documents: list[Text] = Field(min_length=1, max_length=MAX_DOCUMENTS)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class ServingMetrics:
    """Prometheus metrics of one server, in their own registry (several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("clara_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("clara_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.batch_size = Histogram("clara_batch_size", "requests per batched model call", ["operation"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("clara_batch_duration_seconds", "time of one batched model call", ["operation"],
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.queue_depth = Gauge("clara_queue_depth", "requests waiting for a batch", ["operation"], registry=self.registry)
        self.rejected = Counter("clara_requests_rejected_total", "requests refused (queue full) or dropped (timeout)",
                                ["operation", "reason"], registry=self.registry)

    def batch_done(self, operation: str, size: int, seconds: float) -> None:
        self.batch_size.labels(operation).observe(size)
        self.batch_seconds.labels(operation).observe(seconds)

    def watch_queue(self, batcher: DynamicBatcher) -> None:
        self.queue_depth.labels(batcher.operation).set_function(lambda: batcher.queue_depth)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def error_response(status: int, message: str, field: str | None = None, kind: str = "invalid_request",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message, "type": kind}}, status_code=status, headers=headers)


def _validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"] if part != "body"]
    field = ".".join(location) or "body"
    if error["type"] == "json_invalid":
        return error_response(400, f"invalid JSON: {error.get('ctx', {}).get('error', error['msg'])}", "body", "invalid_json")
    if error["type"] == "missing" and not location:
        return error_response(400, "the request needs a JSON object body", "body", "missing_body")
    return error_response(422, f"{field}: {error['msg']}", field, error["type"])


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` is a 413 before the application reads it into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # a chunked body has no content-length: count as it arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
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

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than {self.max_bytes} bytes", "body", "body_too_large")
        await response(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------------
# The application


def create_app(engine: ClaraServingEngine, settings: ServeSettings, backend: str = "transformers") -> FastAPI:
    """The FastAPI app serving `engine`; batchers start with the app and stop with it."""
    metrics = ServingMetrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clara-model")  # the model is not thread-safe
    batchers = {
        name: DynamicBatcher(name, run, executor, settings.max_batch_size, settings.max_wait_ms / 1000,
                             settings.max_queue, on_batch=metrics.batch_done)
        for name, run in (("compress", engine.compress_batch), ("search", engine.search_batch),
                          ("answer", engine.answer_batch))
    }
    for batcher in batchers.values():
        metrics.watch_queue(batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for batcher in batchers.values():
            batcher.start()
        yield
        for batcher in batchers.values():
            await batcher.stop()
        executor.shutdown(wait=True, cancel_futures=True)
        engine.generator.close()

    app = FastAPI(title="CLaRa", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # inside the counting middleware below

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.monotonic()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"  # bounded label values
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return response

    async def run(operation: str, item, key=None, problem: RequestError | None = None):
        """Submit to a batcher; turn queue-full, timeout and per-request model errors into HTTP responses.

        A `problem` known before queueing (the server cannot serve this request at all) is answered at once."""
        if problem is not None:
            return error_response(problem.status, str(problem), problem.field)
        try:
            return await batchers[operation].submit(item, key=key, timeout=settings.request_timeout_s)
        except QueueFullError as error:
            metrics.rejected.labels(operation, "queue_full").inc()
            return error_response(503, str(error), kind="queue_full", headers={"Retry-After": str(error.retry_after)})
        except TimeoutError:
            metrics.rejected.labels(operation, "timeout").inc()
            return error_response(504, f"no result within the server's {settings.request_timeout_s} s timeout; the "
                                  "request was cancelled", kind="timeout")
        except RequestError as error:
            return error_response(error.status, str(error), error.field)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "backend": backend,
                "index_documents": None if engine.index is None else len(engine.index),
                "queue_depth": {name: b.queue_depth for name, b in batchers.items()}}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/search")
    async def search(body: SearchBody):
        hits = await run("search", SearchRequest(body.question, body.k), problem=engine.search_problem())
        return hits if isinstance(hits, Response) else {"documents": [_hit_json(h) for h in hits]}

    @app.post("/v1/answer")
    async def answer(body: AnswerBody):
        config = engine.model.config
        request = AnswerRequest(body.question, body.documents, body.k or config.generation_top_k,
                                body.max_new_tokens or config.max_new_tokens)
        # One generate call needs one max_new_tokens: requests batch with others that ask for the same.
        result = await run("answer", request, key=request.max_new_tokens, problem=engine.answer_problem(request))
        if isinstance(result, Response):
            return result
        return {"answer": result.answer, "documents": [_hit_json(h) for h in result.documents]}

    @app.post("/v1/compress")
    async def compress(body: CompressBody):
        memory = await run("compress", body.documents)
        if isinstance(memory, Response):
            return memory
        payload = save_safetensors({"memory": memory.contiguous()})  # safetensors, never pickle
        return {"memory": base64.b64encode(payload).decode("ascii"), "shape": list(memory.shape),
                "dtype": str(memory.dtype).removeprefix("torch.")}

    return app


def _hit_json(hit: Hit) -> dict:
    return {"id": hit.id, "score": hit.score, "text": hit.text}
