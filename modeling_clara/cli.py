"""`clara` command line: one subcommand per feature module, each registered by that module's `register_cli`."""

import argparse
import importlib
import logging
import os

# Modules that contribute subcommands; each defines `register_cli(subparsers)` and sets `func` on its parsers.
COMMAND_MODULES = ("convert_apple", "training", "evaluation", "index", "synthesis", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara", description="CLaRa: compress, retrieve and answer in latent space")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(f"modeling_clara.{module}").register_cli(subparsers)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_package_logs()
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
