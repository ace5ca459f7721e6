"""`clara` command line: one module per command in this package, imported only when its command runs.

`clara --help` lists the commands from `COMMANDS` without importing any of them, and `clara <command>` imports that
command's module alone, so a base install (`pip install clara-hf`, no extras) runs every command whose code does not
need an extra; a command that does (`eval` needs `evaluate`, `serve` needs `fastapi`, ...) stops with the
`pip install "clara-hf[<extra>]"` to run. Each module defines `add_parser(subparsers, name, help)`, which adds the
command's parser with `run(args) -> int` as its default `run`.

    clara train ...    or    python -m modeling_clara.cli train ...    (also under torchrun / accelerate launch)
"""

import argparse
import importlib
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # in this package
    help: str


COMMANDS = {
    "convert": Command("convert", "convert Apple's CLaRa folders to this package's safetensors format, or back"),
    "train": Command("train", "train one CLaRa stage (pretrain, instruct, e2e) with the Hugging Face Trainer"),
    "eval": Command("eval", "answer quality of CLaRa and its baselines (EM / F1 / Cover-EM, Recall@k)"),
    "eval-retrieval": Command(
        "eval_retrieval", "Recall@1/3/5 of CLaRa's query reasoner, MiniLM and BM25 on the same candidates"
    ),
    "index": Command("index", "build, extend and search a compressed corpus index"),
    "ask": Command("ask", "answer a question from an index: retrieve, then generate"),
    "synthesize": Command(
        "synthesize", "stage-1 QA / paraphrase data from a corpus, verified by the generator (resumable)"
    ),
    "serve": Command("serve", "serve search, answer and compress over HTTP with dynamic batching"),
}

# setup.py's extras by the top-level modules they install: a command that fails to import one names the extra.
EXTRA_OF_MODULE = {
    "gguf": "embedded",
    "evaluate": "eval", "rank_bm25": "eval", "sentence_transformers": "eval", "matplotlib": "eval",
    "faiss": "faiss",
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
    "vllm": "vllm",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `clara` parser, with the arguments of `command` only: the other commands are listed, not imported."""
    parser = argparse.ArgumentParser(prog="clara", description="CLaRa: compress, retrieve and answer in latent space")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        if name == command:
            importlib.import_module(f"{__name__}.{spec.module}").add_parser(subparsers, name, spec.help)
        else:
            subparsers.add_parser(name, help=spec.help)  # never parses: `main` builds the chosen command's parser
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top-level parser has no options but --help, so the first non-option argument names the command.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    with _naming_missing_extras(command):
        args = build_parser(command).parse_args(argv)
        show_package_logs()
        status = args.run(args) or 0
    _leave_process_group()
    return status


@contextmanager
def _naming_missing_extras(command: str | None):
    try:
        yield
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        raise SystemExit(f'clara {command} needs the {extra} extra: pip install "clara-hf[{extra}]" ({error})') from error


def _leave_process_group() -> None:
    # Under torchrun / accelerate launch the command's TrainingArguments or PartialState joined a process group.
    # Left to interpreter exit, gloo's threads can outlive the interpreter and abort the process (SIGABRT,
    # "terminate called without an active exception") after the work succeeded.
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def show_package_logs() -> None:
    """Send this package's log records to stderr (level from CLARA_VERBOSITY, default info): the CLI reports progress.

    Library users configure logging themselves; the package's loggers are not under transformers' verbosity.
    """
    package_logger = logging.getLogger("modeling_clara")
    package_logger.setLevel(os.environ.get("CLARA_VERBOSITY", "info").upper())
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[clara %(levelname)s] %(message)s"))
        package_logger.addHandler(handler)


__all__ = ["COMMANDS", "build_parser", "main", "show_package_logs"]
