"""`clara index build|search|add|delete`: a `ClaraIndex` on the command line (`clara ask` answers from one)."""

import argparse

from ..index import DEFAULT_SHARD_SIZE, FAISS_KINDS, ClaraIndex
from ..loading import distributed_state, load_model
from .options import CORPUS_HELP, add_model_option, add_output_dir_option, add_top_k_option, top_k

RECORDED_MODEL = "the model recorded in the index"


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    index = subparsers.add_parser(name, help=help)
    commands = index.add_subparsers(dest="index_command", required=True)

    build = commands.add_parser("build", help="compress a corpus into an index (resumable; data-parallel under "
                                "accelerate launch / torchrun)")
    add_model_option(build)
    build.add_argument("--corpus", required=True, help=CORPUS_HELP)
    add_output_dir_option(build, "index folder", required=True, deprecated="--out")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    build.add_argument("--faiss", choices=FAISS_KINDS, default=None, help="also build an approximate FAISS index")
    build.add_argument("--pooled", action="store_true", help="FAISS over mean-pooled memory tokens")
    build.set_defaults(run=run_build)

    search = commands.add_parser("search", help="top-k documents of a question")
    search.add_argument("index")
    search.add_argument("question")
    add_model_option(search, required=False, default=RECORDED_MODEL)
    add_top_k_option(search, verb="returned")
    search.set_defaults(run=run_search)

    add = commands.add_parser("add", help="compress and add documents to an index")
    add.add_argument("index")
    add.add_argument("--corpus", required=True, help=CORPUS_HELP)
    add_model_option(add, required=False, default=RECORDED_MODEL)
    add.add_argument("--batch-size", type=int, default=8)
    add.set_defaults(run=run_add)

    delete = commands.add_parser("delete", help="remove documents from an index by id")
    delete.add_argument("index")
    delete.add_argument("ids", nargs="+")
    delete.set_defaults(run=run_delete)


def open_index(path: str, model_name: str | None, device: str | None = None) -> ClaraIndex:
    """The index at `path` with its model attached: `model_name`, else the one the index records."""
    index = ClaraIndex.load(path)
    name = model_name or index.model_name
    if not name:
        raise SystemExit(f"{path} records no model; pass --model")
    index.attach_model(load_model(name, device=device))
    return index


def print_hits(ids: list[str], scores: list[float], texts: list[str]) -> None:
    for rank, (doc_id, score, text) in enumerate(zip(ids, scores, texts), start=1):
        print(f"{rank:>3}. [{doc_id}] {score:.4f}  {_preview(text)}")


def run_build(args: argparse.Namespace) -> int:
    model = load_model(args.model, device=args.device)
    index = ClaraIndex.build(model, args.corpus, args.batch_size, args.shard_size, output_dir=args.output_dir)
    if args.faiss and distributed_state().is_main_process:
        index.build_faiss(args.faiss, pooled=args.pooled)
        index.save(args.output_dir)
    print(f"{args.output_dir}: {len(index)} documents, {index.fingerprint['n_mem_tokens']} memory tokens each")
    return 0


def run_search(args: argparse.Namespace) -> int:
    index = open_index(args.index, args.model, args.device)
    result = index.search(args.question, k=top_k(args, index.model))
    print_hits(result.ids, result.scores, result.texts)
    return 0


def run_add(args: argparse.Namespace) -> int:
    index = open_index(args.index, args.model, args.device)
    before = len(index)
    index.add(args.corpus, batch_size=args.batch_size)
    index.save(args.index)
    print(f"{args.index}: {before} -> {len(index)} documents")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    index = ClaraIndex.load(args.index)
    index.delete(args.ids)
    index.save(args.index)
    print(f"{args.index}: deleted {len(args.ids)}, {len(index)} documents left")
    return 0


def _preview(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
