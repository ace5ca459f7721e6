"""`clara convert apple-to-hf|hf-to-apple SOURCE OUTPUT_DIR`: `modeling_clara.convert_apple` on the command line."""

import argparse

from ..convert_apple import apple_to_clara, clara_to_apple


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name, help=help,
        description="Lossless conversion between Apple's released format (adapters.pth + "
        "decoder_first_last_layers.pth) and this package's format (model.safetensors).",
    )
    parser.add_argument("direction", choices=("apple-to-hf", "hf-to-apple"))
    parser.add_argument("source", help="checkpoint folder (or Hub id) to read")
    parser.add_argument("output_dir", help="folder to write")
    parser.add_argument(
        "--decoder-model-name", help="backbone to use instead of the config's decoder_model_name (e.g. a local copy)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = {"decoder_model_name": args.decoder_model_name} if args.decoder_model_name else {}
    convert = apple_to_clara if args.direction == "apple-to-hf" else clara_to_apple
    convert(args.source, args.output_dir, **overrides)
    print(f"wrote {args.output_dir}")
    return 0
