"""The options every `clara` command spells and means the same way: `--model`, `--device`, `-k/--top-k`, `--output-dir`.

`--model` is read by [`modeling_clara.loading.load_model`] everywhere; `-k/--top-k` defaults to the model's
`generation_top_k` wherever a model reads or returns documents. Deprecated spellings (`--out`, `clara convert`'s
positional folders) are accepted, hidden from `--help`, with a `FutureWarning` naming the option to use.
"""

import argparse
import warnings

MODEL_HELP = (
    "a CLaRa: `shipped` (the one in this package), a saved folder or Hub id (ours or Apple's), or a backbone "
    "(`embedded`, a causal LM's name or path) for a fresh, untrained CLaRa"
)
CORPUS_HELP = "JSONL with `text` (or `contents`) and optional `id` per line, or `shipped` (the bundled corpus)"
DEVICE_HELP = "default: the accelerator when there is one (each process its own under accelerate launch), else cpu"
TOP_K_HELP = "documents {verb} per question (default: the model's generation_top_k)"


def add_model_option(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    """`--model` and `--device`; `default` says where the model comes from when `--model` is left out."""
    parser.add_argument("--model", required=required, help=MODEL_HELP + (f"; default: {default}" if default else ""))
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def add_top_k_option(parser: argparse.ArgumentParser, verb: str = "read", several: bool = False) -> None:
    """`-k/--top-k`; with `several`, a list of values (one run per value)."""
    help = TOP_K_HELP.format(verb=verb) + ("; one run per value" if several else "")
    parser.add_argument("-k", "--top-k", type=int, nargs="+" if several else None, default=None, help=help)


def top_k(args: argparse.Namespace, model) -> int:
    """`--top-k`, else the model's `generation_top_k`."""
    return model.config.generation_top_k if args.top_k is None else args.top_k


def add_output_dir_option(parser: argparse.ArgumentParser, help: str, required: bool = False,
                          deprecated: str | None = None, deprecated_dest: str = "output_dir") -> None:
    """`--output-dir`, and `deprecated` (a deprecated spelling, stored in `deprecated_dest`) hidden beside it."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--output-dir", help=help)
    if deprecated:
        group.add_argument(deprecated, dest=deprecated_dest, action=DeprecatedOption, new="--output-dir")


class DeprecatedOption(argparse.Action):
    """A deprecated spelling of an option: stored as given, hidden from `--help`, with a warning naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{parser.prog} {option_string} is deprecated; use {self.new}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


__all__ = ["add_model_option", "add_output_dir_option", "add_top_k_option", "top_k"]
