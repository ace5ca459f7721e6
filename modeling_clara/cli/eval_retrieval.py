"""`clara eval-retrieval`: Recall@1/3/5 of each ranker on each data file's candidates."""

import argparse

from ..evaluation import RANKERS, Ranker, default_output_dir, evaluate_retrieval, expand_data_paths, markdown_table
from .eval import add_model_arguments, load_eval_model


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name, help=help,
        description="Rank each question's candidates with each ranker and report Recall@1/3/5 against `pos_index`. "
        "Rankers: clara (the query reasoner; needs a model that has one, e.g. --stage e2e for "
        "'embedded'), bm25, minilm, given_order (the file's order; the data files are shuffled, so it is chance).",
    )
    add_model_arguments(parser, required=False)
    parser.add_argument("--ranker", nargs="+", default=list(RANKERS), choices=RANKERS)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    files = expand_data_paths(args.data)
    model = None
    if "clara" in args.ranker:
        if args.model is None:
            raise SystemExit("--ranker clara needs --model")
        model = load_eval_model(args)
    output_dir = args.output_dir or (default_output_dir(model, args.model) if model else "eval_results/retrieval")
    rankers = [Ranker(name, model) for name in dict.fromkeys(args.ranker)]
    summaries = [
        evaluate_retrieval(data, ranker, model, args.limit, args.batch_size, output_dir, model_name=args.model)
        for data in files
        for ranker in rankers
    ]
    print(markdown_table(summaries))
    return 0
