"""`clara index build|search|add|delete|vector-index|convert`: a `ClaraIndex` on the command line.

Every INDEX is a URI: a local folder or an object-store prefix (`s3://bucket/prefix`, `gs://...`, `az://...`,
credentials from the environment as LanceDB reads them). `clara ask` answers from one.
"""

import argparse

from ..index import (
    DEFAULT_COMMIT_ROWS,
    DEFAULT_KMEANS_ITERATIONS,
    DEFAULT_KMEANS_SAMPLE_RATE,
    DEFAULT_NPROBES,
    DEFAULT_REFINE_FACTOR,
    SEARCH_BACKENDS,
    VECTOR_INDEX_KINDS,
    ClaraIndex,
    convert_legacy_index,
)
from ..loading import distributed_state, load_model
from .options import CORPUS_HELP, add_model_option, add_output_dir_option, add_top_k_option, top_k

RECORDED_MODEL = "the model recorded in the index"
INDEX_HELP = "the index URI: a folder or an object-store prefix (s3://, gs://, az://)"


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    index = subparsers.add_parser(name, help=help)
    commands = index.add_subparsers(dest="index_command", required=True)

    build = commands.add_parser("build", help="compress a corpus into an index (resumable; data-parallel under "
                                "accelerate launch / torchrun, every process appending to the one table)")
    add_model_option(build)
    build.add_argument("--corpus", required=True, help=CORPUS_HELP)
    add_output_dir_option(build, "the index URI (a folder or s3://, gs://, az://)", required=True, deprecated="--out")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--commit-rows", type=int, default=DEFAULT_COMMIT_ROWS,
                       help="documents per commit: the work a killed build process loses")
    build.add_argument("--memory-dtype", choices=("float32", "float16"), default=None,
                       help="how the memory is stored (default: float16 for a float16 model, else float32)")
    build.add_argument("--overwrite", action="store_true", help="replace an index already there")
    add_vector_index_options(build, default=None)
    build.set_defaults(run=run_build)

    search = commands.add_parser("search", help="top-k documents of a question")
    search.add_argument("index", help=INDEX_HELP)
    search.add_argument("question")
    add_model_option(search, required=False, default=RECORDED_MODEL)
    add_top_k_option(search, verb="returned")
    add_search_options(search)
    search.add_argument("--backend", choices=SEARCH_BACKENDS, default="lance",
                        help="who proposes candidates: exact search or the table's vector index (lance), or a FAISS "
                        "index built in RAM from the table first (faiss, the faiss extra; docs/index-sizing.md)")
    search.set_defaults(run=run_search)

    add = commands.add_parser("add", help="compress and add documents to an index (one commit)")
    add.add_argument("index", help=INDEX_HELP)
    add.add_argument("--corpus", required=True, help=CORPUS_HELP)
    add_model_option(add, required=False, default=RECORDED_MODEL)
    add.add_argument("--batch-size", type=int, default=8)
    add.set_defaults(run=run_add)

    delete = commands.add_parser("delete", help="remove documents from an index by id (one commit)")
    delete.add_argument("index", help=INDEX_HELP)
    delete.add_argument("ids", nargs="+")
    delete.set_defaults(run=run_delete)

    vector_index = commands.add_parser("vector-index", help="build the approximate search index of an index's table "
                                       "(again after many adds: later rows are searched exactly beside it)")
    vector_index.add_argument("index", help=INDEX_HELP)
    add_vector_index_options(vector_index, default="ivf_sq")
    vector_index.set_defaults(run=run_vector_index)

    convert = commands.add_parser("convert", help="copy a clara-index/1 folder (CURRENT + safetensors shards) into "
                                  "an index of this version")
    convert.add_argument("source", help="the clara-index/1 folder")
    add_output_dir_option(convert, "the new index URI", required=True)
    convert.add_argument("--overwrite", action="store_true", help="replace an index already there")
    convert.set_defaults(run=run_convert)


def add_vector_index_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--vector-index", choices=VECTOR_INDEX_KINDS, default=default,
                        help="approximate search index (see docs/index-sizing.md for when)"
                        + ("" if default else "; default: none, exact search"))
    parser.add_argument("--num-partitions", type=int, default=None, help="IVF partitions (default: about sqrt(rows))")
    parser.add_argument("--num-sub-vectors", type=int, default=None,
                        help="PQ bytes per document (default: one per 32 memory values)")
    parser.add_argument("--kmeans-sample-rate", type=int, default=DEFAULT_KMEANS_SAMPLE_RATE,
                        help="rows per partition the partitions are trained on")
    parser.add_argument("--kmeans-iterations", type=int, default=DEFAULT_KMEANS_ITERATIONS,
                        help="k-means iterations of the partitions' training")


def create_vector_index(index: ClaraIndex, args: argparse.Namespace) -> None:
    """The vector index `add_vector_index_options` describe."""
    index.create_vector_index(args.vector_index, args.num_partitions, args.num_sub_vectors,
                              kmeans_sample_rate=args.kmeans_sample_rate, kmeans_iterations=args.kmeans_iterations)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nprobes", type=int, default=DEFAULT_NPROBES, help="IVF partitions searched (vector index only)")
    parser.add_argument("--refine-factor", type=int, default=DEFAULT_REFINE_FACTOR,
                        help="candidates per hit re-ranked on the full memory (vector index only)")


def open_index(path: str, model_name: str | None, device: str | None = None, search_backend: str = "lance") -> ClaraIndex:
    """The index at `path` with its model attached: `model_name`, else the one the index records."""
    try:
        index = ClaraIndex.load(path, search_backend=search_backend)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(f"clara: {error}") from error
    name = model_name or index.model_name
    if not name:
        raise SystemExit(f"{path} records no model; pass --model")
    try:
        index.attach_model(load_model(name, device=device))
    except ValueError as error:  # another compressor built the index
        raise SystemExit(f"clara: {error}") from error
    return index


def print_hits(ids: list[str], scores: list[float], texts: list[str]) -> None:
    for rank, (doc_id, score, text) in enumerate(zip(ids, scores, texts), start=1):
        print(f"{rank:>3}. [{doc_id}] {score:.4f}  {_preview(text)}")


def run_build(args: argparse.Namespace) -> int:
    model = load_model(args.model, device=args.device)
    try:
        index = ClaraIndex.build(model, args.corpus, args.batch_size, output_dir=args.output_dir,
                                 commit_rows=args.commit_rows, overwrite=args.overwrite, memory_dtype=args.memory_dtype)
    except ValueError as error:
        raise SystemExit(f"clara index build: {error}") from error
    if distributed_state().is_main_process:
        if args.vector_index:
            create_vector_index(index, args)
        print(f"{args.output_dir}: {len(index)} documents, {index.fingerprint['n_mem_tokens']} memory tokens each")
    return 0


def run_search(args: argparse.Namespace) -> int:
    index = open_index(args.index, args.model, args.device, args.backend)
    result = index.search(args.question, k=top_k(args, index.model), nprobes=args.nprobes, refine_factor=args.refine_factor)
    print_hits(result.ids, result.scores, result.texts)
    return 0


def run_add(args: argparse.Namespace) -> int:
    index = open_index(args.index, args.model, args.device)
    before = len(index)
    index.add(args.corpus, batch_size=args.batch_size)
    print(f"{args.index}: {before} -> {len(index)} documents")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    index = ClaraIndex.load(args.index)
    index.delete(args.ids)
    print(f"{args.index}: deleted {len(args.ids)}, {len(index)} documents left")
    return 0


def run_vector_index(args: argparse.Namespace) -> int:
    index = ClaraIndex.load(args.index)
    create_vector_index(index, args)
    print(f"{args.index}: {args.vector_index} over {len(index)} documents")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    try:
        index = convert_legacy_index(args.source, args.output_dir, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"clara index convert: {error}") from error
    print(f"{args.output_dir}: {len(index)} documents converted from {args.source}")
    return 0


def _preview(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
