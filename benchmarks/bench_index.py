"""ClaraIndex benchmarks, each printed side by side in one run.

1. Build: `ClaraIndex.build` (compress + write to the LanceDB table) next to a plain forward of the bare backbone
   (loaded on its own, LM head on, as any causal-LM forward) over the same encoder tokens, interleaved rounds, median.
   Also bytes per document on disk.
2. Search: synthetic clustered memories of a model's shape (n_mem x hidden, flattened) written to a ClaraIndex
   table, then, on the same vectors and queries: exact search (ClaraIndex's matmul, all queries in one pass over the
   table: the ground truth), LanceDB's IVF_SQ, IVF_HNSW_SQ and IVF_PQ (ClaraIndex.create_vector_index with the
   shipped defaults, candidates re-ranked on the stored memory) and ClaraIndex's FAISS backend
   (`search_backend="faiss"`, IVF-Flat by default, `--faiss` for others such as IVF-PQ; built in RAM from the table,
   candidates re-scored on the stored memory). For each: build seconds (wall, and CPU seconds of this process: the machine may be shared), index
   bytes (LanceDB: on disk; FAISS: in RAM), recall@k against exact, queries per second and p50 / p99 latency of one
   query at a time. Vectors are generated, written and scored in batches: the corpus never sits in RAM whole.

    python benchmarks/bench_index.py build --n-docs 32 --rounds 3
    python benchmarks/bench_index.py search --n-vectors 100000 --n-mem 16 --hidden 576 --memory-dtype float16
    python benchmarks/bench_index.py search --n-vectors 1000000 --n-mem 16 --hidden 576 --memory-dtype float16 \
        --kinds ivf_sq --faiss 'IVF{n_list},PQ{pq_m}'                                   # shipped shape, 1M
    python benchmarks/bench_index.py search --n-vectors 100000 --n-mem 16 --hidden 4096 --memory-dtype float16 \
        --kinds ivf_sq --faiss                                                          # CLaRa-7B, CR 16
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel

from bench_compress import plain_backbone  # the bare backbone both build benchmarks time against
from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.index import (
    DEFAULT_KMEANS_ITERATIONS,
    DEFAULT_KMEANS_SAMPLE_RATE,
    DEFAULT_NPROBES,
    DEFAULT_REFINE_FACTOR,
    TABLE_NAME,
    VECTOR_INDEX_KINDS,
    connect,
    index_schema,
    memory_batch,
)

DATA_FILE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "hotpotqa_dev.jsonl"


def passages(n: int) -> list[str]:
    found = []
    for line in open(DATA_FILE, encoding="utf-8"):
        for doc in json.loads(line)["docs"]:
            if doc not in found:
                found.append(doc)
            if len(found) == n:
                return found
    return found


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------------
# Build


@torch.no_grad()
def plain_forward(model: ClaraForRAG, backbone: PreTrainedModel, texts: list[str], batch_size: int) -> None:
    """The bare backbone over exactly the encoder inputs `compress` reads (same ids, same padding)."""
    for start in range(0, len(texts), batch_size):
        inputs, _ = model.processor.encode_documents(texts[start : start + batch_size])
        backbone(**{name: tensor.to(backbone.device) for name, tensor in inputs.items()})


def bench_build(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = ClaraForRAG.from_backbone("embedded", compr_rate=16, doc_max_length=256, training_stage="stage2").eval()
    texts = passages(args.n_docs)
    backbone = plain_backbone(model)
    build_seconds, plain_seconds, sizes = [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            ClaraIndex.build(model, texts, batch_size=args.batch_size, output_dir=folder)
            build_seconds.append(time.perf_counter() - start)
            sizes.append(folder_bytes(folder))
        start = time.perf_counter()
        plain_forward(model, backbone, texts, args.batch_size)
        plain_seconds.append(time.perf_counter() - start)
    build, plain = statistics.median(build_seconds), statistics.median(plain_seconds)
    print(f"documents: {len(texts)}, encoder tokens/doc: {model.config.doc_max_length + 3 + model.n_mem_tokens}")
    print(f"| step | docs/s |\n|---|---|\n| ClaraIndex.build (compress + commit) | {len(texts) / build:.2f} |\n"
          f"| plain backbone forward | {len(texts) / plain:.2f} |")
    print(f"build / plain throughput ratio: {plain / build:.2f}x")
    print(f"bytes per document on disk: {sizes[-1] / len(texts):,.0f} (memory: {model.n_mem_tokens} x "
          f"{model.hidden_size} x 4 bytes = {model.n_mem_tokens * model.hidden_size * 4:,})")


# ----------------------------------------------------------------------------------------------------------------
# Search


def clustered_chunks(n: int, dim: int, n_clusters: int, seed: int, chunk: int = 8192):
    """Gaussian clusters, generated chunk by chunk: documents on a topic sit near each other, as real embeddings do
    (uniform noise would make every approximate index look worse than it is on real data)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=generator)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        assignment = torch.randint(n_clusters, (rows,), generator=generator)
        yield start, centers[assignment] + 0.6 * torch.randn(rows, dim, generator=generator)


def synthetic_index(folder: str, args: argparse.Namespace) -> tuple[ClaraIndex, torch.Tensor, float]:
    """A ClaraIndex table of synthetic memories, the queries (perturbed stored vectors), and the write seconds."""
    dim = args.n_mem * args.hidden
    fingerprint = {"n_mem_tokens": args.n_mem, "hidden_size": args.hidden}
    schema = index_schema(fingerprint, None, args.memory_dtype)
    table = connect(folder).create_table(TABLE_NAME, schema=schema)
    generator = torch.Generator().manual_seed(args.seed + 1)
    picked = set(torch.randint(args.n_vectors, (args.n_queries,), generator=generator).tolist())
    queries, generating, generating_cpu = [], 0.0, 0.0

    def batches():
        nonlocal generating, generating_cpu
        chunks = clustered_chunks(args.n_vectors, dim, max(16, args.n_vectors // 1000), args.seed)
        while True:
            began, began_cpu = time.perf_counter(), time.process_time()
            try:
                start, vectors = next(chunks)
            except StopIteration:
                return
            queries.extend(vectors[i - start].clone() for i in sorted(picked) if start <= i < start + len(vectors))
            generating += time.perf_counter() - began
            generating_cpu += time.process_time() - began_cpu
            ids = [str(i) for i in range(start, start + len(vectors))]
            yield memory_batch(schema, ids, [""] * len(ids), vectors.view(len(ids), args.n_mem, args.hidden))

    began, began_cpu = time.perf_counter(), time.process_time()
    table.add(pa.RecordBatchReader.from_batches(schema, batches()))
    # converting and committing, not making up the vectors
    write = (time.perf_counter() - began - generating, time.process_time() - began_cpu - generating_cpu)
    queries = torch.stack(queries) + 0.6 * torch.randn(len(queries), dim, generator=generator)
    return ClaraIndex(table, refresh_interval=None, exact_cache_bytes=int(args.exact_cache_gib * 2**30)), queries, write


def latencies(search, queries: torch.Tensor) -> tuple[list[list[str]], list[float]]:
    """Hit ids and seconds of each query, one query at a time, after one untimed query (which reads what the
    search keeps in RAM: ClaraIndex's exact memory, LanceDB's index partitions)."""
    search(queries[:1])
    hits, seconds = [], []
    for query in queries:
        start = time.perf_counter()
        hits.append(search(query.unsqueeze(0)))
        seconds.append(time.perf_counter() - start)
    return hits, seconds


def row(name: str, build: tuple[float, float] | None, size: int | None, hits, exact_hits, seconds: list[float]) -> str:
    recall = statistics.mean(len(set(h) & set(e)) / len(e) for h, e in zip(hits, exact_hits))
    p50, p99 = np.percentile(seconds, 50) * 1000, np.percentile(seconds, 99) * 1000
    build_text = "–" if build is None else f"{build[0]:.0f} ({build[1]:.0f})"
    size_text = "–" if size is None else f"{size / 2**20:,.0f}"
    return f"| {name} | {build_text} | {size_text} | {recall:.3f} | {1 / statistics.mean(seconds):.1f} | {p50:.1f} | {p99:.1f} |"


def timed(work) -> tuple[float, float]:
    """Wall and CPU seconds (every thread of this process) of `work()`."""
    began, began_cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - began, time.process_time() - began_cpu


def faiss_ram_bytes(ivf) -> int:
    """What an IVF index holds in RAM: a code and an id per vector, and the coarse centroids."""
    return ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4


def bench_search(args: argparse.Namespace) -> None:
    import faiss

    dim = args.n_mem * args.hidden
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        index, queries, write = synthetic_index(folder, args)
        table_bytes = folder_bytes(folder)
        print(f"{args.n_vectors:,} memories of {args.n_mem} x {args.hidden} = {dim:,} values ({args.memory_dtype}), "
              f"{len(queries)} queries one at a time, k={args.k}, torch threads {torch.get_num_threads()}; LanceDB "
              f"partitions trained on {DEFAULT_KMEANS_SAMPLE_RATE} rows each, {DEFAULT_KMEANS_ITERATIONS} k-means iterations")
        print(f"table: written in {write[0]:.0f} s ({write[1]:.0f} CPU s; conversion + commit), "
              f"{table_bytes / 2**20:,.0f} MiB on disk ({table_bytes / args.n_vectors:,.0f} bytes per memory)", flush=True)

        def clara_search(query, searcher=index, **options):
            return searcher.search_embeddings(query, k=args.k, **options)[0].ids

        # The ground truth: every query in one exact pass over the table (streamed when the column exceeds the cache).
        exact_hits = []
        truth = timed(lambda: exact_hits.extend(r.ids for r in index.search_embeddings(queries, k=args.k)))
        print(f"exact top-{args.k} of {len(queries)} queries in one pass: {truth[0]:.0f} s ({truth[1]:.0f} CPU s)", flush=True)
        print("| search | build s (CPU s) | index MiB | recall@k vs exact | QPS | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|")
        if index._cache is not None:  # one query at a time is only worth timing from RAM
            hits, seconds = latencies(clara_search, queries)
            print(row("ClaraIndex exact (memory column in RAM)", None, None, hits, exact_hits, seconds), flush=True)
        index._cache = None  # the RAM goes to the indexes below

        for kind in args.kinds:
            indices = Path(folder) / f"{TABLE_NAME}.lance" / "_indices"
            before = folder_bytes(indices)  # a dropped index's files stay on disk
            build = timed(lambda: index.create_vector_index(kind))
            size = folder_bytes(indices) - before
            for nprobes, refine_factor in args.settings:
                hits, seconds = latencies(lambda q: clara_search(q, nprobes=nprobes, refine_factor=refine_factor), queries)
                name = f"LanceDB {kind.upper()} nprobes {nprobes} refine {refine_factor}"
                print(row(name, build, size, hits, exact_hits, seconds), flush=True)
            index.table.drop_index("memory_idx")

        for factory in args.faiss:
            searcher = ClaraIndex(index.table, search_backend="faiss", faiss_factory=factory)
            build = timed(searcher._faiss_index)
            ivf = faiss.extract_index_ivf(searcher._faiss_index())
            size, n_list = faiss_ram_bytes(ivf), ivf.nlist
            for nprobes, refine_factor in args.settings:
                hits, seconds = latencies(
                    lambda q: clara_search(q, searcher, nprobes=nprobes, refine_factor=refine_factor), queries)
                name = f"ClaraIndex FAISS {factory} ({n_list} lists) nprobe {nprobes} refine {refine_factor}"
                print(row(name, build, size, hits, exact_hits, seconds), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build")
    build.add_argument("--n-docs", type=int, default=32)
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--rounds", type=int, default=3)
    search = commands.add_parser("search")
    search.add_argument("--n-vectors", type=int, default=100_000)
    search.add_argument("--n-mem", type=int, default=16)
    search.add_argument("--hidden", type=int, default=576)
    search.add_argument("--memory-dtype", choices=("float32", "float16"), default="float32")
    search.add_argument("--n-queries", type=int, default=100)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--kinds", nargs="+", default=list(VECTOR_INDEX_KINDS), choices=VECTOR_INDEX_KINDS)
    search.add_argument("--settings", nargs="+", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=[(DEFAULT_NPROBES, DEFAULT_REFINE_FACTOR)],
                        help="nprobes,refine_factor pairs; the first is the shipped default")
    search.add_argument("--faiss", nargs="*", default=["IVF{n_list},Flat"],
                        help="factory strings of ClaraIndex's FAISS backend ({n_list}: about sqrt(n) lists, {pq_m}: "
                        "one byte per 32 values), e.g. 'IVF{n_list},PQ{pq_m}'; none to skip FAISS")
    search.add_argument("--exact-cache-gib", type=float, default=8.0,
                        help="ClaraIndex exact search keeps the memory in RAM up to this size (float32)")
    search.add_argument("--scratch", default=None, help="folder for the table (default: the system's temp folder)")
    search.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_build(args) if args.command == "build" else bench_search(args)


if __name__ == "__main__":
    main()
