"""`clara eval`: every method and setting asked for, on every data file, into one output folder and table."""

import argparse
from pathlib import Path

from .. import evaluation
from ..configuration_clara import TRAINING_STAGES
from ..evaluation import (
    DEFAULT_MAX_NEW_TOKENS,
    METHODS,
    SETTINGS,
    CompressedDocuments,
    EvalMethod,
    collect_summaries,
    default_output_dir,
    evaluate_file,
    expand_data_paths,
    load_model_for_eval,
    markdown_table,
)


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name, help=help, description=evaluation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--method", nargs="+", default=["clara"], choices=METHODS)
    parser.add_argument("--setting", nargs="+", default=["normal"], choices=SETTINGS)
    parser.add_argument("--top-k", type=int, default=5, help="documents read per question")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The model, data and output options that `clara eval` and `clara eval-retrieval` share."""
    parser.add_argument("--model", required=required, help="'embedded' (a fresh, untrained CLaRa on the embedded "
                        "backbone) or a saved CLaRa: folder or Hub id, ours or Apple's")
    parser.add_argument("--data", required=True, nargs="+", help="end-to-end JSONL files or folders of them")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each file")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output-dir", default=None, help="default: eval_results/<model name>")
    group = parser.add_argument_group("--model embedded only")
    group.add_argument("--compr-rate", type=int, default=16)
    group.add_argument("--doc-max-length", type=int, default=256)
    group.add_argument("--training-stage", default="stage1_2", choices=TRAINING_STAGES,
                       help="decides the adapters; stage2 adds a (fresh) query reasoner")
    group.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def load_model(args: argparse.Namespace):
    return load_model_for_eval(
        args.model, args.compr_rate, args.doc_max_length, args.training_stage, args.seed, args.device
    )


def run(args: argparse.Namespace) -> int:
    files = expand_data_paths(args.data)
    model = load_model(args)
    output_dir = args.output_dir or default_output_dir(model, args.model)
    compressed = CompressedDocuments(model)
    methods = [EvalMethod(name, model, compressed) for name in dict.fromkeys(args.method)]
    summaries, done = [], set()
    for data in files:
        for method in methods:
            for setting in dict.fromkeys(args.setting):
                if (data, method.name, method.setting(setting)) in done:  # closed_book / text_oracle: once
                    continue
                done.add((data, method.name, method.setting(setting)))
                summaries.append(evaluate_file(
                    model, data, method, setting, args.top_k, args.limit, args.batch_size, args.max_new_tokens,
                    output_dir, model_name=args.model,
                ))
    (Path(output_dir) / "summary.md").write_text(markdown_table(collect_summaries(output_dir)))
    print(markdown_table(summaries))
    return 0
