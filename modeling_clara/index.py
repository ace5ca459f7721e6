"""`ClaraIndex`: compress a corpus once, then retrieve in CLaRa's latent space and answer from it.

On disk an index is a folder whose `CURRENT` file names the complete version to read:

    my_index/
      CURRENT                      "v-<time>-<random>": replaced atomically (os.replace) as the last step of a save
      v-.../index.json             format, compressor fingerprint, shapes, shard list, deleted positions, FAISS options
      v-.../shards/*.safetensors   "embeddings" (n, n_mem, hidden) and "norms" (n,) of the flattened embeddings
      v-.../documents/             ids and texts (a `datasets` Arrow table: memory-mapped, not read into RAM)
      v-.../faiss.index            optional approximate index over the flattened or pooled vectors
      .build/                      only while `build(..., output_dir=)` runs: finished shards, for resuming

A save writes a new version beside the old one and switches `CURRENT` last, so a crash at any point leaves the
previous index loadable. Shards are read lazily with `safetensors.safe_open` (memory-mapped): exact search streams
them chunk by chunk and only the rows asked for are materialised.
"""

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from .corpus import corpus_fingerprint, read_corpus
from .fingerprint import compressor_weights, weights_sha256
from .jsonl import write_text_atomic
from .loading import distributed_state
from .modeling_clara import ClaraForRAG, cosine_scores
from .processing_clara import check_positive

logger = logging.get_logger(__name__)

INDEX_FORMAT = "clara-index/1"
CURRENT_FILE = "CURRENT"
METADATA_FILE = "index.json"
FAISS_FILE = "faiss.index"
BUILD_DIR = ".build"
DEFAULT_SHARD_SIZE = 4096
# Rows scored at once by exact search: bounds memory to chunk * n_mem * hidden floats.
SEARCH_CHUNK_ROWS = 8192
FAISS_KINDS = ("flat", "ivf", "hnsw", "pq")
# Candidates an approximate index returns per requested hit, before CLaRa's exact cosine re-scores them.
DEFAULT_RERANK_FACTOR = 4


@dataclass
class SearchResult:
    """Hits of one question, best first: document ids, CLaRa cosine scores, texts, and positions in the index."""

    ids: list[str]
    scores: list[float]
    texts: list[str]
    positions: list[int]


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints


def compressor_fingerprint(model: ClaraForRAG) -> dict:
    """What decides a document's embedding: backbone, layout, and a hash of the encoder adapter and added rows."""
    config = model.config
    return {
        "backbone": str(config.decoder_model_name),
        "compr_rate": config.compr_rate,
        "doc_max_length": config.doc_max_length,
        "n_mem_tokens": model.n_mem_tokens,
        "hidden_size": model.hidden_size,
        "different_mem_tokens": config.different_mem_tokens,
        "compressor_sha256": weights_sha256(compressor_weights(model)),
    }


def check_fingerprint(index_fingerprint: dict, model: ClaraForRAG, where: str) -> None:
    """Raise if `model` would compress documents differently from the model that built the index."""
    expected = compressor_fingerprint(model)
    changed = [key for key in expected if expected[key] != index_fingerprint.get(key)]
    if changed:
        raise ValueError(
            f"{where} was built by another compressor: {', '.join(f'{k}={index_fingerprint.get(k)!r}' for k in changed)}"
            f" but this model has {', '.join(f'{k}={expected[k]!r}' for k in changed)}; rebuild the index with this model"
        )


# ----------------------------------------------------------------------------------------------------------------
# Shards


class _Shard:
    """Rows of embeddings and their norms, in memory (`tensor`) or in a safetensors file read lazily."""

    def __init__(self, embeddings: torch.Tensor | None = None, norms: torch.Tensor | None = None, path: Path | None = None):
        self.path, self._embeddings, self._norms, self._file = path, embeddings, norms, None
        if path is not None:
            self._file = safe_open(str(path), framework="pt")  # memory-mapped; opened now so later renames are safe
            self._embeddings = self._file.get_slice("embeddings")
            self._norms = self._file.get_tensor("norms")
        self.n = self._embeddings.get_shape()[0] if path is not None else embeddings.shape[0]

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor) -> "_Shard":
        embeddings = embeddings.detach().cpu().contiguous()  # shards live in host memory, whatever compressed them
        return cls(embeddings, embeddings.flatten(start_dim=1).float().norm(dim=-1))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._embeddings[start:stop]

    def take(self, rows: list[int]) -> torch.Tensor:
        return torch.stack([self._embeddings[r : r + 1][0] for r in rows]) if self.path else self._embeddings[rows]

    @property
    def norms(self) -> torch.Tensor:
        return self._norms

    def write(self, path: Path) -> None:
        """Write (or hard-link, when this shard already lives in a file) to `path`, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        if self.path is not None:
            try:
                os.link(self.path, tmp)
            except OSError:
                shutil.copyfile(self.path, tmp)
        else:
            save_file({"embeddings": self._embeddings, "norms": self._norms}, str(tmp))
            _fsync(tmp)
        os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# The index


class ClaraIndex:
    """Compressed documents of a corpus with exact (default) or FAISS search by CLaRa's query reasoner.

    Build with [`ClaraIndex.build`], load with [`ClaraIndex.load`]; `model.answer(question, index=index)` answers
    from the top `generation_top_k` documents.
    """

    def __init__(self, model: ClaraForRAG | None, fingerprint: dict, documents: datasets.Dataset, shards: list[_Shard],
                 deleted: set[int] | None = None, dtype: torch.dtype = torch.float32):
        self.model, self.fingerprint, self.documents, self.shards = model, fingerprint, documents, shards
        self.deleted, self.dtype = set(deleted or ()), dtype
        self.faiss_index, self.faiss_options = None, None
        self._offsets = self._shard_offsets()
        self._position_of = None
        self.model_name = str(model.name_or_path) if model is not None else None

    # -- building -------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model: ClaraForRAG, corpus, batch_size: int = 8, shard_size: int = DEFAULT_SHARD_SIZE,
              output_dir: str | os.PathLike | None = None) -> "ClaraIndex":
        """Compress a corpus into an index.

        Args:
            corpus: Texts, a `datasets.Dataset` or a JSONL path (see [`read_corpus`]).
            shard_size: Documents per shard: the unit that is saved, resumed and spread over processes.
            output_dir: Save the index there, writing each shard as it completes: a killed build run again with
                the same model and corpus resumes after the last finished shard. Under `accelerate launch` /
                `torchrun`, each process compresses every n-th shard and the main process merges them (needs
                `output_dir` on a filesystem all processes share).
        """
        check_positive("batch_size", batch_size)
        check_positive("shard_size", shard_size)
        documents = read_corpus(corpus)
        fingerprint = compressor_fingerprint(model)
        spans = [(start, min(start + shard_size, len(documents))) for start in range(0, len(documents), shard_size)]
        state = distributed_state()
        if output_dir is None:
            if state.num_processes > 1:
                raise ValueError("a data-parallel build needs output_dir (a folder every process can write)")
            shards = [_Shard.from_embeddings(cls._compress_span(model, documents, span, batch_size, i, len(spans), 0))
                      for i, span in enumerate(spans)]
            return cls(model, fingerprint, documents, shards, dtype=model.dtype)

        build_dir = Path(output_dir) / BUILD_DIR
        if state.is_main_process:
            cls._prepare_build_dir(build_dir, fingerprint, documents, shard_size)
        state.wait_for_everyone()
        for i in range(state.process_index, len(spans), state.num_processes):
            path = build_dir / f"shard-{i:05d}.safetensors"
            if path.exists():
                continue
            embeds = cls._compress_span(model, documents, spans[i], batch_size, i, len(spans), state.process_index)
            _Shard.from_embeddings(embeds).write(path)
        state.wait_for_everyone()
        if state.is_main_process:
            shards = [_Shard(path=build_dir / f"shard-{i:05d}.safetensors") for i in range(len(spans))]
            cls(model, fingerprint, documents, shards, dtype=model.dtype).save(output_dir)
            shutil.rmtree(build_dir)
        state.wait_for_everyone()
        return cls.load(output_dir, model=model)

    @staticmethod
    def _compress_span(model, documents, span, batch_size, shard, n_shards, process) -> torch.Tensor:
        start, stop = span
        logger.info(f"process {process}: compressing shard {shard + 1}/{n_shards} (documents {start}-{stop - 1})")
        return model.compress(documents[start:stop]["text"], batch_size=batch_size, show_progress_bar=True)

    @staticmethod
    def _prepare_build_dir(build_dir: Path, fingerprint: dict, documents: datasets.Dataset, shard_size: int) -> None:
        plan = {"fingerprint": fingerprint, "corpus_sha256": corpus_fingerprint(documents), "shard_size": shard_size,
                "n_documents": len(documents)}
        plan_path = build_dir / "build.json"
        if plan_path.exists():
            previous = json.loads(plan_path.read_text())
            if previous == plan:
                done = len(list(build_dir.glob("shard-*.safetensors")))
                logger.warning(f"{build_dir}: resuming an interrupted build ({done} shards already done)")
                return
            logger.warning(f"{build_dir}: an interrupted build of another corpus or model; starting over")
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(plan_path, json.dumps(plan, indent=2))

    def add(self, corpus, batch_size: int = 8) -> None:
        """Compress and append documents (ids must be new); a FAISS index gets the new vectors too."""
        new = read_corpus(corpus, first_id=len(self.documents))
        clashes = set(new["id"]) & set(self.documents["id"])
        if clashes:
            raise ValueError(f"document ids already in the index: {sorted(clashes)[:5]}")
        model = self._require_model("add")
        embeds = model.compress(list(new["text"]), batch_size=batch_size)
        shard = _Shard.from_embeddings(embeds)
        self.shards.append(shard)
        self.documents = datasets.concatenate_datasets([self.documents, new])
        self._offsets, self._position_of = self._shard_offsets(), None
        if self.faiss_index is not None:
            self.faiss_index.add(self._faiss_vectors(embeds, self.faiss_options["pooled"]))

    def delete(self, ids: list[str] | str) -> None:
        """Remove documents by id: they are never returned again and are dropped from the next saved FAISS index."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        positions = self._positions_of_ids(ids)
        self.deleted.update(positions)

    def texts(self, ids: list[str]) -> list[str]:
        """The texts of documents by id."""
        return list(self.documents.select(self._positions_of_ids(list(ids)))["text"])

    def __len__(self) -> int:
        return len(self.documents) - len(self.deleted)

    # -- search ---------------------------------------------------------------------------------------------------

    def search(self, questions: str | list[str], k: int = 10, rerank_factor: int = DEFAULT_RERANK_FACTOR
               ) -> SearchResult | list[SearchResult]:
        """The top-k documents for each question by the query reasoner's cosine similarity.

        Exact search by default; with a FAISS index (`build_faiss`), FAISS proposes `k * rerank_factor` candidates
        and CLaRa's exact cosine re-scores them. `k` larger than the documents returns all of them.
        """
        single = isinstance(questions, str)
        check_positive("k", k)
        check_positive("rerank_factor", rerank_factor)
        model = self._require_model("search")
        if not model.has_query_reasoner:
            raise ValueError(
                f"searching an index needs a model with a query reasoner (this one has {model.adapter_names}); "
                "load a stage-3 (e2e) CLaRa"
            )
        results = self.search_embeddings(model.encode_queries(questions), k, rerank_factor)
        return results[0] if single else results

    def search_embeddings(self, query_reps: torch.Tensor, k: int = 10, rerank_factor: int = DEFAULT_RERANK_FACTOR
                          ) -> list[SearchResult]:
        """`search` for query embeddings already computed (`model.encode_queries`: `(n, n_mem * hidden)`)."""
        check_positive("k", k)
        check_positive("rerank_factor", rerank_factor)
        n_mem, hidden = self._embedding_shape()
        if query_reps.dim() != 2 or query_reps.shape[1] != n_mem * hidden:
            raise ValueError(f"query_reps has shape {tuple(query_reps.shape)}; expected (n, {n_mem * hidden})")
        k = min(k, len(self))
        if k == 0:
            raise ValueError("the index holds no documents")
        if self.faiss_index is None:
            candidates = self._exact_candidates(query_reps, k)
        else:
            candidates = self._faiss_candidates(query_reps, k * rerank_factor)
        return [self._rescore(query, positions, k) for query, positions in zip(query_reps, candidates)]

    def embeddings(self, positions: list[int]) -> torch.Tensor:
        """`(len(positions), n_mem, hidden)` embeddings at index positions (as `SearchResult.positions`)."""
        rows = []
        for position in positions:
            shard = int(torch.searchsorted(self._offsets, torch.tensor(position), right=True)) - 1
            if not 0 <= position < len(self.documents):
                raise IndexError(f"position {position} is outside the index (0..{len(self.documents) - 1})")
            rows.append(self.shards[shard].take([position - int(self._offsets[shard])])[0])
        return torch.stack(rows)

    def _exact_candidates(self, query_reps: torch.Tensor, k: int) -> list[list[int]]:
        queries = F.normalize(query_reps.float().cpu(), dim=-1)  # scored where the shards are
        best_scores = torch.full((len(queries), 0), float("-inf"))
        best_positions = torch.zeros((len(queries), 0), dtype=torch.long)
        deleted = torch.tensor(sorted(self.deleted), dtype=torch.long)
        for shard, offset in zip(self.shards, self._offsets.tolist()):
            for start in range(0, shard.n, SEARCH_CHUNK_ROWS):
                stop = min(start + SEARCH_CHUNK_ROWS, shard.n)
                flat = shard.rows(start, stop).flatten(start_dim=1).float()
                scores = (queries @ flat.T) / shard.norms[start:stop].clamp_min(1e-12)
                positions = torch.arange(offset + start, offset + stop)
                scores[:, torch.isin(positions, deleted)] = float("-inf")
                merged = torch.cat([best_scores, scores], dim=1)
                top = merged.topk(min(k, merged.shape[1]), dim=1)
                best_scores = top.values
                best_positions = torch.cat([best_positions, positions.expand(len(queries), -1)], dim=1).gather(1, top.indices)
        return [[p for p, s in zip(ps, ss) if s > float("-inf")] for ps, ss in zip(best_positions.tolist(), best_scores.tolist())]

    def _faiss_candidates(self, query_reps: torch.Tensor, n: int) -> list[list[int]]:
        vectors = self._faiss_vectors(query_reps.view(len(query_reps), *self._embedding_shape()), self.faiss_options["pooled"])
        _, found = self.faiss_index.search(vectors, min(n + len(self.deleted), self.faiss_index.ntotal))
        return [[p for p in row if p >= 0 and p not in self.deleted] for row in found.tolist()]

    def _rescore(self, query: torch.Tensor, positions: list[int], k: int) -> SearchResult:
        # CLaRa's own cosine (the function `retrieve` uses), so scores and order equal `model.retrieve` on these docs.
        candidates = self.embeddings(positions).to(device=query.device, dtype=query.dtype)
        scores = cosine_scores(query.unsqueeze(0), candidates.unsqueeze(0))[0]
        top = scores.topk(min(k, len(positions)))
        chosen = [positions[i] for i in top.indices.tolist()]
        rows = self.documents.select(chosen)
        return SearchResult(list(rows["id"]), top.values.tolist(), list(rows["text"]), chosen)

    # -- FAISS ----------------------------------------------------------------------------------------------------

    def build_faiss(self, kind: str = "ivf", pooled: bool = False, nlist: int = 1024, pq_m: int = 64,
                    hnsw_m: int = 32, nprobe: int = 16, ef_search: int = 64) -> None:
        """Add an approximate FAISS index (inner product on L2-normalised vectors) for large corpora.

        Args:
            kind: `"flat"` (exact, FAISS's BLAS), `"ivf"` (inverted lists, `nlist` cells, `nprobe` searched),
                `"hnsw"` (graph, `hnsw_m` links, `ef_search`), `"pq"` (IVF with product quantisation, `pq_m` bytes a
                vector).
            pooled: Index the mean of the memory tokens (`hidden` dims) instead of the flattened embedding
                (`n_mem * hidden`): n_mem times smaller and faster, less faithful; re-scoring stays exact.
        """
        import faiss

        if kind not in FAISS_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {FAISS_KINDS}")
        n_mem, hidden = self._embedding_shape()
        dim = hidden if pooled else n_mem * hidden
        n_cells = max(1, min(nlist, len(self.documents) // 39))  # FAISS wants ~39 training points per cell
        if kind == "pq" and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the vector dimension {dim}")
        # 8-bit codes need 256 training points per sub-quantiser; small corpora get fewer bits instead of an error.
        pq_bits = max(1, min(8, int(math.log2(len(self.documents)))))
        factory = {"flat": "Flat", "ivf": f"IVF{n_cells},Flat", "hnsw": f"HNSW{hnsw_m}",
                   "pq": f"IVF{n_cells},PQ{pq_m}x{pq_bits}"}[kind]
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        vectors = [self._faiss_vectors(shard.rows(0, shard.n), pooled) for shard in self.shards]
        if not index.is_trained:
            index.train(_training_sample(vectors))
        for chunk in vectors:
            index.add(chunk)
        self.faiss_index = index
        self.faiss_options = {"kind": kind, "pooled": pooled, "factory": factory, "nprobe": nprobe, "ef_search": ef_search}
        self._apply_faiss_search_options()

    def _apply_faiss_search_options(self) -> None:
        import faiss

        options = self.faiss_options
        if options["kind"] in ("ivf", "pq"):
            faiss.extract_index_ivf(self.faiss_index).nprobe = options["nprobe"]
        if options["kind"] == "hnsw":
            self.faiss_index.hnsw.efSearch = options["ef_search"]

    def _faiss_vectors(self, embeds: torch.Tensor, pooled: bool):
        embeds = embeds.float().cpu()
        vectors = embeds.mean(dim=1) if pooled else embeds.flatten(start_dim=1)
        return F.normalize(vectors, dim=-1).numpy()

    # -- saving and loading ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to `path` atomically: the previous content stays loadable until the new one is complete.

        Deleted documents are dropped from the saved FAISS index only by rebuilding it (`build_faiss`); until then
        they stay in it and are filtered at search time.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        previous = _current_version(root)
        version = f"v-{uuid.uuid4().hex[:12]}"
        target = root / version
        for i, shard in enumerate(self.shards):
            shard.write(target / "shards" / f"shard-{i:05d}.safetensors")
        self.documents.save_to_disk(str(target / "documents"))
        if self.faiss_index is not None:
            import faiss

            faiss.write_index(self.faiss_index, str(target / FAISS_FILE))
        metadata = {
            "format": INDEX_FORMAT,
            "fingerprint": self.fingerprint,
            "model": self.model_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_documents": len(self.documents),
            "shards": [shard.n for shard in self.shards],
            "deleted": sorted(self.deleted),
            "faiss": self.faiss_options,
        }
        write_text_atomic(target / METADATA_FILE, json.dumps(metadata, indent=2))
        write_text_atomic(root / CURRENT_FILE, version + "\n")  # the switch: everything before it is invisible
        for stale in root.glob("v-*"):
            if stale.name not in (version,) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"saved index of {len(self)} documents to {root} (version {version}, previous {previous})")

    @classmethod
    def load(cls, path: str | os.PathLike, model: ClaraForRAG | None = None) -> "ClaraIndex":
        """Open a saved index (memory-mapped). With `model`, check that it compresses as the index's builder did."""
        root = Path(path)
        version = _current_version(root)
        if version is None:
            raise FileNotFoundError(f"{root} is not a CLaRa index (no {CURRENT_FILE} file)")
        folder = root / version
        metadata_path = folder / METADATA_FILE
        try:
            metadata = json.loads(metadata_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{metadata_path}: unreadable index metadata ({error})") from error
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{metadata_path}: format {metadata.get('format')!r}, expected {INDEX_FORMAT!r}")
        if model is not None:
            check_fingerprint(metadata["fingerprint"], model, str(root))
        shards = [_Shard(path=folder / "shards" / f"shard-{i:05d}.safetensors") for i in range(len(metadata["shards"]))]
        if [s.n for s in shards] != metadata["shards"]:
            raise ValueError(f"{folder}: shard sizes {[s.n for s in shards]} differ from the metadata {metadata['shards']}")
        documents = datasets.load_from_disk(str(folder / "documents"))
        index = cls(model, metadata["fingerprint"], documents, shards, set(metadata["deleted"]),
                    getattr(torch, metadata["dtype"]))
        index.model_name = metadata.get("model") or index.model_name
        if metadata.get("faiss"):
            import faiss

            index.faiss_index = faiss.read_index(str(folder / FAISS_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            index.faiss_options = metadata["faiss"]
            index._apply_faiss_search_options()
        return index

    def attach_model(self, model: ClaraForRAG) -> None:
        """Use `model` for search and add; it must compress as the index's builder did."""
        check_fingerprint(self.fingerprint, model, "this index")
        self.model = model

    # -- helpers --------------------------------------------------------------------------------------------------

    def _require_model(self, action: str) -> ClaraForRAG:
        if self.model is None:
            raise ValueError(f"{action} needs a model: ClaraIndex.load(path, model=...) or index.attach_model(model)")
        return self.model

    def _shard_offsets(self) -> torch.Tensor:
        return torch.tensor([0] + [s.n for s in self.shards], dtype=torch.long).cumsum(0)[:-1]

    def _embedding_shape(self) -> tuple[int, int]:
        return self.fingerprint["n_mem_tokens"], self.fingerprint["hidden_size"]

    def _positions_of_ids(self, ids: list[str]) -> list[int]:
        if self._position_of is None:
            self._position_of = {doc_id: i for i, doc_id in enumerate(self.documents["id"])}
        unknown = [i for i in ids if i not in self._position_of or self._position_of[i] in self.deleted]
        if unknown:
            raise KeyError(f"document ids not in the index: {unknown[:5]}")
        return [self._position_of[i] for i in ids]


def open_or_build_index(model: ClaraForRAG, corpus=None, index_dir: str | os.PathLike | None = None,
                        batch_size: int = 8) -> ClaraIndex:
    """The index of `corpus` for `model`, kept in `index_dir`: the one cache policy of every job that indexes a corpus.

    The index in `index_dir` is reused when `model` compresses as its builder did and (with `corpus`) it holds exactly
    the corpus's documents, ids and texts; otherwise the corpus is compressed into `index_dir` again, with a warning
    saying why (a build interrupted there resumes). Without `index_dir` the index is built in memory.

    Args:
        corpus: Texts, a `datasets.Dataset`, a JSONL path or `"shipped"` (see [`read_corpus`]). Without it, the index
            in `index_dir` is opened as it is.
    Raises:
        `ValueError`: neither argument given, or only `index_dir`, whose index another compressor built.
        `FileNotFoundError`: only `index_dir`, and it holds no index.
    """
    if corpus is None and index_dir is None:
        raise ValueError("open_or_build_index needs a corpus, an index_dir, or both")
    documents = None if corpus is None else read_corpus(corpus)
    if index_dir is not None and (corpus is None or (Path(index_dir) / CURRENT_FILE).exists()):
        try:
            index = ClaraIndex.load(index_dir, model=model)
        except ValueError as error:  # another compressor built it
            if documents is None:
                raise
            logger.warning(f"rebuilding {index_dir}: {error}")
        else:
            if documents is None or corpus_fingerprint(index.documents) == corpus_fingerprint(documents):
                return index
            logger.warning(f"rebuilding {index_dir}: it holds other documents than the corpus given")
    return ClaraIndex.build(model, documents, batch_size=batch_size, output_dir=index_dir)


def _training_sample(vectors: list, max_rows: int = 100_000):
    import numpy as np

    stacked = np.concatenate(vectors)
    if len(stacked) <= max_rows:
        return stacked
    rows = np.random.default_rng(0).choice(len(stacked), max_rows, replace=False)
    return stacked[np.sort(rows)]


def _current_version(root: Path) -> str | None:
    current = root / CURRENT_FILE
    if not current.exists():
        return None
    version = current.read_text().strip()
    if not (root / version).is_dir():
        raise ValueError(f"{current} names {version!r}, which is missing from {root}")
    return version
