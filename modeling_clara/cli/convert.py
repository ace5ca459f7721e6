"""`clara convert apple-to-hf|hf-to-apple --model SOURCE --output-dir DIR`: `modeling_clara.convert_apple` on the
command line."""

import argparse
import warnings

from ..convert_apple import apple_to_clara, clara_to_apple
from .options import add_output_dir_option


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name, help=help,
        description="Lossless conversion between Apple's released format (adapters.pth + "
        "decoder_first_last_layers.pth) and this package's format (model.safetensors).",
    )
    parser.add_argument("direction", choices=("apple-to-hf", "hf-to-apple"))
    parser.add_argument("--model", help="the CLaRa to convert: a checkpoint folder or Hub id")
    add_output_dir_option(parser, "folder to write")
    # Deprecated: `clara convert DIRECTION SOURCE OUTPUT_DIR`.
    parser.add_argument("source", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("positional_output_dir", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--decoder-model-name", help="backbone to use instead of the config's decoder_model_name (e.g. a local copy)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.source is not None or args.positional_output_dir is not None:
        warnings.warn("clara convert SOURCE OUTPUT_DIR is deprecated; use --model SOURCE --output-dir OUTPUT_DIR",
                      FutureWarning, stacklevel=2)
    if (args.model and args.source) or (args.output_dir and args.positional_output_dir):
        raise SystemExit("clara convert: give the checkpoint and the folder once each, as --model and --output-dir")
    source, output_dir = args.model or args.source, args.output_dir or args.positional_output_dir
    if source is None or output_dir is None:
        raise SystemExit("clara convert needs --model (the checkpoint to read) and --output-dir (the folder to write)")
    overrides = {"decoder_model_name": args.decoder_model_name} if args.decoder_model_name else {}
    convert = apple_to_clara if args.direction == "apple-to-hf" else clara_to_apple
    convert(source, output_dir, **overrides)
    print(f"wrote {output_dir}")
    return 0
