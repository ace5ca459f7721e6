"""`clara ask --index URI QUESTION`: retrieve from a `ClaraIndex`, then answer from the retrieved documents."""

import argparse

from .index import INDEX_HELP, RECORDED_MODEL, open_index, print_hits
from .options import add_model_option, add_top_k_option


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    ask = subparsers.add_parser(name, help=help)
    ask.add_argument("--index", required=True, help=INDEX_HELP)
    ask.add_argument("question")
    add_model_option(ask, required=False, default=RECORDED_MODEL)
    add_top_k_option(ask)
    ask.add_argument("--max-new-tokens", type=int, default=None)
    ask.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    index = open_index(args.index, args.model, args.device)
    out = index.model.answer(args.question, index=index, k=args.top_k, return_dict=True,
                             max_new_tokens=args.max_new_tokens)
    print("Retrieved:")
    print_hits(out["doc_indices"], out["scores"], index.texts(out["doc_indices"]))
    print(f"Answer: {out['answer']}")
    return 0
