"""`clara train`: every field of `ClaraScriptArguments` and `ClaraTrainingArguments` as an option, then `train_clara`."""

import argparse
import json
from dataclasses import fields

from transformers import HfArgumentParser
from transformers.utils import logging

from .. import training
from ..configuration_clara import stage_name
from ..training import ClaraScriptArguments, ClaraTrainingArguments, train_clara


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name,
        parents=[HfArgumentParser((ClaraScriptArguments, ClaraTrainingArguments), add_help=False)],
        help=help,
        description=training.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for action in parser._actions:
        if action.dest == "output_dir":
            action.required = True  # the trained model goes there; no silent `trainer_output`
        if action.dest == "stage":
            action.type = stage_name  # Apple's names (stage1, stage1_2, stage2) are accepted as aliases
    parser.set_defaults(run=run)


def parse_train_args(argv: list[str]) -> tuple[ClaraScriptArguments, ClaraTrainingArguments]:
    """The arguments of `clara train ARGV`, as dataclasses (to call [`train_clara`] with extra callbacks)."""
    subparsers = argparse.ArgumentParser(prog="clara").add_subparsers()
    add_parser(subparsers, "train", help="")
    return _arguments_from_namespace(subparsers.choices["train"].parse_args(argv))


def _arguments_from_namespace(namespace: argparse.Namespace) -> tuple[ClaraScriptArguments, ClaraTrainingArguments]:
    values = vars(namespace)
    script_args, args = (
        cls(**{f.name: values[f.name] for f in fields(cls) if f.init and f.name in values})
        for cls in (ClaraScriptArguments, ClaraTrainingArguments)
    )
    return script_args, args


def run(namespace: argparse.Namespace) -> int:
    try:
        script_args, args = _arguments_from_namespace(namespace)
    except ValueError as error:  # a bad value or combination of options, named by the arguments' checks
        raise SystemExit(f"clara train: {error}") from error
    logging.set_verbosity(args.get_process_log_level())
    result = train_clara(script_args, args)
    if args.process_index == 0:
        print(json.dumps(result, sort_keys=True))
    return 0
