"""`clara` command line: one subcommand per feature module, each registered by that module's `register_cli`."""

import argparse
import importlib

# Modules that contribute subcommands; each defines `register_cli(subparsers)` and sets `func` on its parsers.
COMMAND_MODULES = ("convert_apple",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara", description="CLaRa: compress, retrieve and answer in latent space")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(f"modeling_clara.{module}").register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
