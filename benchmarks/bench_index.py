"""ClaraIndex benchmarks, each printed as ratios measured side by side in one run.

1. Build: `ClaraIndex.build` (compress + shard + save) next to a plain forward of the bare backbone (loaded on its
   own, LM head on, as any causal-LM forward) over the same encoder tokens, interleaved rounds, median. Also bytes per
   document on disk.
2. Search: exact search vs the FAISS options (flat, IVF, HNSW, IVF-PQ) on synthetic clustered vectors, as latency per
   query and recall@k against exact search. Every FAISS hit list is re-scored by CLaRa's exact cosine, as in real
   use. The flattened run has the embedded backbone's size (n_mem 16 x hidden 576 = 9216 dims); the large run uses
   pooled-size vectors (576 dims), as `build_faiss(pooled=True)` indexes them.

    python benchmarks/bench_index.py build --n-docs 32 --rounds 3
    python benchmarks/bench_index.py search --n-vectors 100000 --n-mem 16 --hidden 576
    python benchmarks/bench_index.py search --n-vectors 1000000 --n-mem 1 --hidden 576
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.backbone import load_backbone, resolve_backbone_path
from modeling_clara.index import FAISS_KINDS, _Shard

DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa_dev.jsonl"


def passages(n: int) -> list[str]:
    found = []
    for line in open(DATA_FILE, encoding="utf-8"):
        for doc in json.loads(line)["docs"]:
            if doc not in found:
                found.append(doc)
            if len(found) == n:
                return found
    return found


# ----------------------------------------------------------------------------------------------------------------
# Build


def plain_backbone(model: ClaraForRAG) -> PreTrainedModel:
    """The model's backbone loaded again on its own, without LoRA layers, its vocabulary resized to CLaRa's tokenizer
    so that it reads the same token ids."""
    config = model.config
    backbone = load_backbone(resolve_backbone_path(config.decoder_model_name), config, torch_dtype=model.dtype)
    backbone.resize_token_embeddings(len(model.tokenizer))
    return backbone.to(model.device).eval()


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
            sizes.append(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()))
            shard_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
        start = time.perf_counter()
        plain_forward(model, backbone, texts, args.batch_size)
        plain_seconds.append(time.perf_counter() - start)
    build, plain = statistics.median(build_seconds), statistics.median(plain_seconds)
    print(f"documents: {len(texts)}, encoder tokens/doc: {model.config.doc_max_length + 3 + model.n_mem_tokens}")
    print(f"| step | docs/s |\n|---|---|\n| ClaraIndex.build (compress + write) | {len(texts) / build:.2f} |\n"
          f"| plain backbone forward | {len(texts) / plain:.2f} |")
    print(f"build / plain throughput ratio: {plain / build:.2f}x")
    print(f"bytes per document: {sizes[-1] / len(texts):,.0f} on disk "
          f"({shard_bytes / len(texts):,.0f} of them embeddings: {model.n_mem_tokens} x {model.hidden_size} "
          f"x {torch.finfo(model.dtype).bits // 8} bytes)")


# ----------------------------------------------------------------------------------------------------------------
# Search


def clustered_vectors(n: int, dim: int, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian clusters: documents on a topic sit near each other, as real embeddings do (uniform noise would make
    every approximate index look worse than it is on real data)."""
    centers = torch.randn(n_clusters, dim, generator=generator)
    assignment = torch.randint(n_clusters, (n,), generator=generator)
    out = torch.empty(n, dim)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        out[start:stop] = centers[assignment[start:stop]] + 0.6 * torch.randn(stop - start, dim, generator=generator)
    return out


def synthetic_index(n: int, n_mem: int, hidden: int, seed: int) -> tuple[ClaraIndex, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vectors = clustered_vectors(n, n_mem * hidden, max(16, n // 1000), generator)
    documents = datasets.Dataset.from_dict({"id": [str(i) for i in range(n)], "text": [""] * n})
    fingerprint = {"n_mem_tokens": n_mem, "hidden_size": hidden}
    index = ClaraIndex(None, fingerprint, documents, [_Shard.from_embeddings(vectors.view(n, n_mem, hidden))])
    picked = torch.randint(n, (200,), generator=generator)
    queries = vectors[picked] + 0.6 * torch.randn(len(picked), n_mem * hidden, generator=generator)
    return index, queries


def timed_search(index: ClaraIndex, queries: torch.Tensor, k: int, batch: int) -> tuple[list[list[int]], float]:
    start, hits = time.perf_counter(), []
    for i in range(0, len(queries), batch):
        hits += [r.positions for r in index.search_embeddings(queries[i : i + batch], k=k)]
    return hits, (time.perf_counter() - start) / len(queries)


def bench_search(args: argparse.Namespace) -> None:
    index, queries = synthetic_index(args.n_vectors, args.n_mem, args.hidden, args.seed)
    queries = queries[: args.n_queries]
    exact_hits, exact_seconds = timed_search(index, queries, args.k, args.query_batch)
    print(f"{args.n_vectors:,} vectors of {args.n_mem} x {args.hidden} = {args.n_mem * args.hidden} dims, "
          f"{len(queries)} queries, k={args.k}")
    print("| search | build s | ms/query | speed-up vs exact | recall@k vs exact |\n|---|---|---|---|---|")
    print(f"| exact (streamed matmul) | – | {1000 * exact_seconds:.1f} | 1.00x | 1.000 |")
    for kind in args.kinds:
        start = time.perf_counter()
        index.build_faiss(kind, nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, ef_search=args.ef_search)
        build = time.perf_counter() - start
        hits, seconds = timed_search(index, queries, args.k, args.query_batch)
        recall = statistics.mean(len(set(h) & set(e)) / len(e) for h, e in zip(hits, exact_hits))
        print(f"| faiss {index.faiss_options['factory']} | {build:.0f} | {1000 * seconds:.1f} | "
              f"{exact_seconds / seconds:.2f}x | {recall:.3f} |")
        index.faiss_index = None


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
    search.add_argument("--n-queries", type=int, default=100)
    search.add_argument("--query-batch", type=int, default=10)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--kinds", nargs="+", default=list(FAISS_KINDS), choices=FAISS_KINDS)
    search.add_argument("--nlist", type=int, default=1024)
    search.add_argument("--nprobe", type=int, default=16)
    search.add_argument("--pq-m", type=int, default=64)
    search.add_argument("--ef-search", type=int, default=64)
    search.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_build(args) if args.command == "build" else bench_search(args)


if __name__ == "__main__":
    main()
