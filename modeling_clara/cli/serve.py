"""`clara serve`: CLaRa over HTTP with dynamic batching (FastAPI + uvicorn, `pip install "clara-hf[serve]"`).

The server lives in `modeling_clara/serving/`; this module only parses the command line and starts it. fastapi,
uvicorn and vLLM are imported when the server starts, so `clara serve --help` works without the extras.
"""

import argparse
import json
from pathlib import Path

from transformers.utils import logging

from ..checkpoints import SHIPPED_CORPUS_FILE
from ..index import ClaraIndex
from ..modeling_clara import ClaraForRAG
from ..serving.engine import ClaraServingEngine, TransformersGenerator

logger = logging.get_logger(__name__)

BACKENDS = ("transformers", "vllm")


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    serve = subparsers.add_parser(name, help=help)
    serve.add_argument("--model", required=True, help="a saved CLaRa (folder, Hub id or `shipped`)")
    serve.add_argument("--index", default=None, help="a ClaraIndex folder: /v1/search, and /v1/answer without documents")
    serve.add_argument("--corpus", default=None,
                       help="JSONL corpus (or `shipped`, the bundled one) to index at start; saved to --index when given "
                            "and reused from there while the model's compressor is unchanged")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--backend", choices=BACKENDS, default="transformers",
                       help="generation engine; compression and retrieval always run in transformers")
    serve.add_argument("--max-batch-size", type=int, default=16, help="requests per batched model call")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="how long the oldest queued request waits for others to batch with (counted from the end "
                            "of the previous batch when that is later)")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests per operation; more get 503")
    serve.add_argument("--request-timeout", type=float, default=60.0,
                       help="seconds before a request is cancelled with 504")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="passed to vllm.LLM (values parsed as JSON when they are), e.g. tensor_parallel_size=4")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the serve extra; `clara` names it when it is missing

    from ..serving.app import ServeSettings, create_app

    model = ClaraForRAG.from_pretrained(args.model)
    index = _open_index(model, args.index, args.corpus)
    generator = _make_generator(args.backend, model, _parse_vllm_args(args.vllm_arg))
    engine = ClaraServingEngine(model, index, generator)
    settings = ServeSettings(args.model, args.max_batch_size, args.max_wait_ms, args.max_queue, args.request_timeout,
                             args.max_body_bytes)
    app = create_app(engine, settings, backend=generator.name)
    logger.info(f"serving {args.model} ({generator.name} backend) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _open_index(model, index_dir: str | None, corpus: str | None):
    if corpus == "shipped":
        corpus = SHIPPED_CORPUS_FILE
    if index_dir is not None and (corpus is None or (Path(index_dir) / "CURRENT").exists()):
        try:
            return ClaraIndex.load(index_dir, model=model)
        except ValueError as error:  # built by another compressor
            if corpus is None:
                raise SystemExit(str(error)) from error
            logger.warning(f"rebuilding {index_dir} from {corpus}: {error}")
    if corpus is None:
        return None
    logger.info(f"indexing {corpus}")
    return ClaraIndex.build(model, corpus, output_dir=index_dir)


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
