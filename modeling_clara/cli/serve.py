"""`clara serve`: CLaRa over HTTP with dynamic batching (FastAPI + uvicorn, `pip install "clara-hf[serve]"`).

The server lives in `modeling_clara/serving/`; this module only parses the command line and starts it. fastapi,
uvicorn and vLLM are imported when the server starts, so `clara serve --help` works without the extras.
"""

import argparse
import json
import os

from transformers.utils import logging

from ..index import SEARCH_BACKENDS, open_or_build_index
from ..loading import load_model
from ..serving.engine import ClaraServingEngine, TransformersGenerator
from ..serving.settings import API_KEY_ENV, ServeSettings, default_allowed_hosts
from .options import CORPUS_HELP, add_model_option

logger = logging.get_logger(__name__)

BACKENDS = ("transformers", "vllm")


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    serve = subparsers.add_parser(name, help=help)
    add_model_option(serve)
    serve.add_argument("--index", default=None,
                       help="a ClaraIndex folder or object-store URI: /v1/search, and /v1/answer without documents")
    serve.add_argument("--index-backend", choices=SEARCH_BACKENDS, default="lance",
                       help="who proposes the index's candidates: exact search or the table's vector index (lance), or "
                       "a FAISS index this process builds in RAM from the table and rebuilds after each refresh that "
                       "finds a new version (faiss, the faiss extra; docs/index-sizing.md)")
    serve.add_argument("--corpus", default=None,
                       help=CORPUS_HELP + ": indexed at start, saved to --index when given and reused from there while "
                       "the model's compressor and the corpus are unchanged")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id of the OpenAI-compatible endpoints (GET /v1/models, the requests' `model`); "
                       "default: the --model value")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--backend", choices=BACKENDS, default="transformers",
                       help="generation engine; compression and retrieval always run in transformers")
    limits = serve.add_argument_group("batching and limits (docs/serving.md)")
    limits.add_argument("--max-batch-size", type=int, default=ServeSettings.max_batch_size,
                        help="requests per batched model call")
    limits.add_argument("--max-wait-ms", type=float, default=ServeSettings.max_wait_ms,
                        help="how long the oldest queued request waits for others to batch with (counted from the "
                             "end of the previous batch when that is later)")
    limits.add_argument("--max-queue", type=int, default=ServeSettings.max_queue,
                        help="requests per operation waiting for the model; more get 503, and /ready says not ready")
    limits.add_argument("--request-timeout", type=float, default=ServeSettings.request_timeout_s,
                        help="seconds before a request is answered 504; its work stops at the next model call")
    limits.add_argument("--max-documents", type=int, default=ServeSettings.max_documents,
                        help="documents one /v1/compress or /v1/answer request may send (at most 64); more get 422")
    limits.add_argument("--max-batch-documents", type=int, default=ServeSettings.max_batch_documents,
                        help="documents compressed in one model call: longer compress requests run in chunks of "
                             "this many, and an answer batch holds at most this many given documents")
    limits.add_argument("--max-new-tokens", type=int, default=ServeSettings.max_new_tokens,
                        help="the most tokens one answer may generate; a request asking more gets 422")
    limits.add_argument("--max-body-bytes", type=int, default=ServeSettings.max_body_bytes,
                        help="larger request bodies get 413")
    connections = serve.add_argument_group("connections and access (docs/serving.md)")
    connections.add_argument("--header-timeout", type=float, default=ServeSettings.header_timeout_s,
                             help="seconds a connection has to send a request's headers; then 408 and closed")
    connections.add_argument("--body-timeout", type=float, default=ServeSettings.body_timeout_s,
                             help="seconds a request has to send its body after its headers; then 408 and closed")
    connections.add_argument("--keep-alive-timeout", type=float, default=ServeSettings.keep_alive_timeout_s,
                             help="seconds an idle connection stays open after a response")
    connections.add_argument("--limit-concurrency", type=int, default=ServeSettings.limit_concurrency,
                             help="open connections (or requests in flight) at most; requests past it get 503")
    connections.add_argument("--max-header-bytes", type=int, default=ServeSettings.max_header_bytes,
                             help="a request line and headers still incomplete past this many bytes get 400 (a complete head "
                                  "that arrives in one read is parsed whatever its size)")
    connections.add_argument("--shutdown-timeout", type=float, default=ServeSettings.shutdown_timeout_s,
                             help="on SIGTERM / SIGINT: seconds to finish requests in flight before cancelling them")
    connections.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                             help="Host header values answered ('*.example.com' patterns; '*': any); others get 400. "
                                  "Default: the loopback names when --host is a loopback address, else any")
    connections.add_argument("--api-key", default=None,
                             help=f"require `Authorization: Bearer KEY` on every endpoint but /health; or set "
                                  f"{API_KEY_ENV} (which keeps the key out of the process list)")
    connections.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                             help="comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto headers "
                                  "are believed; default: none (proxy headers ignored)")
    serve.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="passed to vllm.LLM (values parsed as JSON when they are), e.g. tensor_parallel_size=4")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..serving.app import create_app, serve  # the serve extra; `clara` names it when it is missing

    settings = _settings(args)  # bad options fail before the model loads
    model = load_model(args.model, device=args.device)
    index = _open_index(model, args.index, args.corpus, args.index_backend)
    generator = _make_generator(args.backend, model, _parse_vllm_args(args.vllm_arg))
    engine = ClaraServingEngine(model, index, generator)
    app = create_app(engine, settings, backend=generator.name)
    logger.info(f"serving {args.model} ({generator.name} backend) on http://{args.host}:{args.port}")
    serve(app, settings, args.host, args.port)
    return 0


def _settings(args: argparse.Namespace) -> ServeSettings:
    try:
        return ServeSettings(
            args.served_model_name or args.model, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
            max_documents=args.max_documents, max_batch_documents=args.max_batch_documents,
            max_new_tokens=args.max_new_tokens, header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
            keep_alive_timeout_s=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency,
            max_header_bytes=args.max_header_bytes, shutdown_timeout_s=args.shutdown_timeout,
            allowed_hosts=args.allowed_hosts or default_allowed_hosts(args.host),
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, forwarded_allow_ips=args.forwarded_allow_ips,
        )
    except ValueError as error:
        raise SystemExit(f"clara serve: {error}") from error


def _open_index(model, index_dir: str | None, corpus: str | None, search_backend: str):
    if index_dir is None and corpus is None:
        return None
    try:
        return open_or_build_index(model, corpus, index_dir, search_backend=search_backend)
    # no index there, or another compressor's and no corpus; or the faiss backend without FAISS installed
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(f"clara serve: {error}") from error


def _make_generator(backend: str, model, vllm_args: dict):
    if backend == "transformers":
        if vllm_args:
            raise SystemExit("--vllm-arg needs --backend vllm")
        return TransformersGenerator(model)
    from ..serving.vllm_generator import VllmGenerator

    return VllmGenerator(model, **vllm_args)


def _parse_vllm_args(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--vllm-arg {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a plain string (e.g. distributed_executor_backend=ray)
    return options
