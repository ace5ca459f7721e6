"""`clara eval`: every method and setting asked for, on every data file, into one output folder and table."""

import argparse
from pathlib import Path

from .. import evaluation
from ..configuration_clara import STAGE_NAMES, STAGES_BY_NAME, stage_name
from ..evaluation import (
    DEFAULT_MAX_NEW_TOKENS,
    METHODS,
    SETTINGS,
    CompressedDocuments,
    EvalMethod,
    collect_summaries,
    default_output_dir,
    difference_rows,
    difference_table,
    evaluate_file,
    expand_data_paths,
    markdown_table,
)
from ..loading import is_clara_checkpoint, load_model
from ..text_reader import load_text_reader
from .options import add_model_option, add_output_dir_option, add_top_k_option, top_k


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name, help=help, description=evaluation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--method", nargs="+", default=["clara"], choices=METHODS)
    parser.add_argument("--setting", nargs="+", default=["normal"], choices=SETTINGS)
    add_top_k_option(parser, several=True)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--text-reader", default=None, metavar="DIR",
                        help="the fine-tuned text reader that --method text_reader evaluates (the output_dir of "
                        "`python -m modeling_clara.text_reader`)")
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The model, data and output options that `clara eval` and `clara eval-retrieval` share."""
    add_model_option(parser, required=required)
    parser.add_argument("--data", required=True, nargs="+", help="end-to-end JSONL files or folders of them")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each file")
    parser.add_argument("--batch-size", type=int, default=4)
    add_output_dir_option(parser, "default: eval_results/<model name>")
    group = parser.add_argument_group("a backbone --model only (`embedded`, ...: a fresh, untrained CLaRa)")
    group.add_argument("--compr-rate", type=int, default=16)
    group.add_argument("--doc-max-length", type=int, default=256)
    group.add_argument("--stage", type=stage_name, default="instruct", choices=STAGE_NAMES,
                       help="decides the adapters, as `clara train --stage` (Apple's stage1, stage1_2, stage2 too); "
                       "e2e adds a (fresh) query reasoner")
    group.add_argument("--seed", type=int, default=0)


def load_eval_model(args: argparse.Namespace):
    """`--model` on `--device`; a backbone gets a fresh CLaRa with the architecture options."""
    architecture = {}
    if not is_clara_checkpoint(args.model):
        architecture = dict(compr_rate=args.compr_rate, doc_max_length=args.doc_max_length,
                            training_stage=STAGES_BY_NAME[args.stage].training_stage)
    return load_model(args.model, device=args.device, seed=args.seed, **architecture)


def run(args: argparse.Namespace) -> int:
    files = expand_data_paths(args.data)
    model = load_eval_model(args)
    ks = args.top_k or [top_k(args, model)]
    output_dir = args.output_dir or default_output_dir(model, args.model)
    compressed = CompressedDocuments(model)
    reader = load_text_reader(model, args.text_reader) if args.text_reader and "text_reader" in args.method else None
    methods = [EvalMethod(name, model, compressed, reader, args.text_reader) for name in dict.fromkeys(args.method)]
    summaries, done = [], set()
    for data in files:
        for k in dict.fromkeys(ks):
            for method in methods:
                for setting in dict.fromkeys(args.setting):
                    # closed_book (no k) and text_oracle (one setting) run once however many are asked for
                    reads_k = method.spec.reads != "nothing"
                    run_key = (data, method.name, method.setting(setting), k if reads_k else None)
                    if run_key in done:
                        continue
                    done.add(run_key)
                    summaries.append(evaluate_file(
                        model, data, method, setting, k, args.limit, args.batch_size, args.max_new_tokens,
                        output_dir, model_name=args.model,
                    ))
    (Path(output_dir) / "summary.md").write_text(markdown_table(collect_summaries(output_dir)))
    (Path(output_dir) / "differences.md").write_text(difference_table(difference_rows(output_dir)))
    print(markdown_table(summaries))
    return 0
