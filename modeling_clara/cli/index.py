"""`clara index build|search|add|delete`: a `ClaraIndex` on the command line (`clara ask` answers from one)."""

import argparse

from ..index import DEFAULT_SHARD_SIZE, FAISS_KINDS, ClaraIndex, distributed_state
from ..modeling_clara import ClaraForRAG


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    index = subparsers.add_parser(name, help=help)
    commands = index.add_subparsers(dest="index_command", required=True)

    build = commands.add_parser("build", help="compress a corpus into an index (resumable; data-parallel under "
                                "accelerate launch / torchrun)")
    build.add_argument("--model", required=True, help="a saved CLaRa (folder or Hub id, ours or Apple's)")
    build.add_argument("--corpus", required=True, help="JSONL with `text` (or `contents`) and optional `id` per line")
    build.add_argument("--out", required=True, help="index folder")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    build.add_argument("--faiss", choices=FAISS_KINDS, default=None, help="also build an approximate FAISS index")
    build.add_argument("--pooled", action="store_true", help="FAISS over mean-pooled memory tokens")
    build.set_defaults(run=run_build)

    search = commands.add_parser("search", help="top-k documents of a question")
    search.add_argument("index")
    search.add_argument("question")
    search.add_argument("--model", default=None, help="default: the model recorded in the index")
    search.add_argument("-k", "--top-k", type=int, default=10)
    search.set_defaults(run=run_search)

    add = commands.add_parser("add", help="compress and add documents to an index")
    add.add_argument("index")
    add.add_argument("--corpus", required=True)
    add.add_argument("--model", default=None, help="default: the model recorded in the index")
    add.add_argument("--batch-size", type=int, default=8)
    add.set_defaults(run=run_add)

    delete = commands.add_parser("delete", help="remove documents from an index by id")
    delete.add_argument("index")
    delete.add_argument("ids", nargs="+")
    delete.set_defaults(run=run_delete)


def open_index(path: str, model_name: str | None) -> ClaraIndex:
    """The index at `path` with its model attached: `model_name`, else the one the index records."""
    index = ClaraIndex.load(path)
    name = model_name or index.model_name
    if not name:
        raise SystemExit(f"{path} records no model; pass --model")
    index.attach_model(ClaraForRAG.from_pretrained(name))
    return index


def print_hits(ids: list[str], scores: list[float], texts: list[str]) -> None:
    for rank, (doc_id, score, text) in enumerate(zip(ids, scores, texts), start=1):
        print(f"{rank:>3}. [{doc_id}] {score:.4f}  {_preview(text)}")


def run_build(args: argparse.Namespace) -> int:
    model = ClaraForRAG.from_pretrained(args.model)
    index = ClaraIndex.build(model, args.corpus, args.batch_size, args.shard_size, output_dir=args.out)
    if args.faiss and distributed_state().is_main_process:
        index.build_faiss(args.faiss, pooled=args.pooled)
        index.save(args.out)
    print(f"{args.out}: {len(index)} documents, {index.fingerprint['n_mem_tokens']} memory tokens each")
    return 0


def run_search(args: argparse.Namespace) -> int:
    result = open_index(args.index, args.model).search(args.question, k=args.top_k)
    print_hits(result.ids, result.scores, result.texts)
    return 0


def run_add(args: argparse.Namespace) -> int:
    index = open_index(args.index, args.model)
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
