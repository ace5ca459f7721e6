"""`ClaraIndex`: a corpus compressed once into a LanceDB table, searched in CLaRa's latent space.

An index is the table `clara_index` of a LanceDB database at a URI: a local folder, or an object-store prefix
(`s3://bucket/prefix`, `gs://...`, `az://...`, credentials from the environment as LanceDB reads them, or
`storage_options`). One row per document:

    id      string                                         the corpus id
    text    string
    memory  fixed_size_list<float32 | float16>[n_mem * hidden]   the flattened memory tokens
    norm    float32                                        L2 norm of `memory`, so exact search divides instead of normalising

The schema's metadata (`clara_index`) holds the format, the compressor's fingerprint, the model name and the memory
shape. Every write (a build chunk, `add`, `delete`, a vector index) is one Lance commit: a reader sees the table before
it or after it, never a part, and a killed writer leaves the last committed version. Any number of processes may
append to one table at once (Lance retries concurrent appends). A reader holds one version: `refresh()` moves it to
the newest, and `search` does so itself when `refresh_interval` seconds have passed since the last check.

Search is exact (a streamed matmul over the table's batches) until a vector index exists (`create_vector_index`):
then LanceDB proposes candidates from IVF_SQ (or IVF_HNSW_SQ, IVF_PQ) codes, re-ranked on the stored memory
(`refine_factor`). With `search_backend="faiss"` a FAISS index built in this process's RAM from the table (once per
table version) proposes the candidates instead: more queries per second, and built in seconds, where one process
serves a corpus whose vectors fit its RAM (docs/index-sizing.md). Either way the returned scores are CLaRa's
cosine, computed by the function `model.retrieve` uses.
"""

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers.utils import logging

from .corpus import read_corpus
from .fingerprint import compressor_weights, weights_sha256
from .loading import distributed_state
from .modeling_clara import ClaraForRAG, cosine_scores
from .processing_clara import check_positive

logger = logging.get_logger(__name__)

INDEX_FORMAT = "clara-index/2"
TABLE_NAME = "clara_index"
METADATA_KEY = b"clara_index"
MEMORY_COLUMN = "memory"
# Exact search reads the memory column once per table version into RAM when it is at most this large (searches
# are then one matmul); larger tables are streamed batch by batch on every search.
DEFAULT_EXACT_CACHE_BYTES = 2 * 2**30
# Documents compressed per commit of a build: the work a killed build process loses.
DEFAULT_COMMIT_ROWS = 1024
# Documents compressed per Arrow batch handed to a Lance write (a write of many batches is still one commit).
ROWS_PER_ARROW_BATCH = 256
# Rows scored at once by exact search: bounds memory to chunk * n_mem * hidden floats.
SEARCH_CHUNK_ROWS = 8192
# Seconds a loaded index serves one version before `search` looks for a newer one (another process's add or delete).
DEFAULT_REFRESH_SECONDS = 5.0
VECTOR_INDEX_KINDS = ("ivf_sq", "ivf_hnsw_sq", "ivf_pq")
# The partitions' k-means: rows per partition it samples, and its iterations. Its cost grows with both and with the
# memory width; IVF needs coarse partitions (a query probes 20), not converged ones.
DEFAULT_KMEANS_SAMPLE_RATE = 16
DEFAULT_KMEANS_ITERATIONS = 20
# Who proposes approximate candidates: LanceDB's vector index in the table, or a FAISS index in this process's RAM.
SEARCH_BACKENDS = ("lance", "faiss")
# The FAISS index built from the table: {n_list} is about sqrt(rows) inverted lists, {pq_m} one PQ byte per 32 values
# (`"IVF{n_list},PQ{pq_m}"` when the float32 vectors of IVF-Flat do not fit in RAM; measured coarse at that code size,
# docs/index-sizing.md). Any IVF factory string works.
DEFAULT_FAISS_FACTORY = "IVF{n_list},Flat"
# Training vectors per FAISS inverted list (FAISS asks for at least 39), and at least what 8-bit PQ codebooks need.
FAISS_TRAIN_ROWS_PER_LIST = 40
FAISS_MIN_TRAIN_ROWS = 10_000
# Approximate search defaults, chosen by benchmarks/bench_index.py (docs/index-sizing.md): partitions probed, and
# PQ candidates per hit re-ranked on the full stored memory.
DEFAULT_NPROBES = 20
DEFAULT_REFINE_FACTOR = 10
# The folder layout of clara-index/1 (safetensors shards under a CURRENT file), read only by `convert_legacy_index`.
LEGACY_CURRENT_FILE = "CURRENT"


@dataclass
class SearchResult:
    """Hits of one question, best first: document ids, CLaRa cosine scores, texts, and row ids in the index's table.

    `positions` are Lance row ids of the version the search read: pass them to [`ClaraIndex.embeddings`] before a
    `refresh` (compaction renumbers rows).
    """

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
# The table


def index_schema(fingerprint: dict, model_name: str | None, memory_dtype: str) -> pa.Schema:
    """The table's columns, with the index's metadata in the schema."""
    width = fingerprint["n_mem_tokens"] * fingerprint["hidden_size"]
    metadata = {"format": INDEX_FORMAT, "fingerprint": fingerprint, "model": model_name, "memory_dtype": memory_dtype}
    return pa.schema(
        [("id", pa.string()), ("text", pa.string()), (MEMORY_COLUMN, pa.list_(pa.from_numpy_dtype(np.dtype(memory_dtype)), width)),
         ("norm", pa.float32())],
        metadata={METADATA_KEY: json.dumps(metadata).encode()},
    )


def memory_batch(schema: pa.Schema, ids: list[str], texts: list[str], embeds: torch.Tensor) -> pa.RecordBatch:
    """Rows of the table from compressed documents `(n, n_mem, hidden)`."""
    flat = embeds.detach().flatten(start_dim=1).float().cpu()  # (n, n_mem * hidden)
    stored = flat.numpy().astype(schema.field(MEMORY_COLUMN).type.value_type.to_pandas_dtype())
    width = stored.shape[1]
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(texts, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), width),
         pa.array(torch.from_numpy(stored.astype(np.float32)).norm(dim=-1).numpy(), pa.float32())],
        schema=schema,
    )


def connect(uri: str | os.PathLike, storage_options: dict | None = None):
    """The LanceDB database at `uri` (a folder, `memory://`, or an object-store prefix)."""
    import lancedb  # imported on first use: `import modeling_clara` stays quick for jobs that index nothing

    return lancedb.connect(str(uri), storage_options=storage_options)


def index_exists(uri: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """Whether `uri` holds a CLaRa index table."""
    if _is_local(uri) and not Path(uri).is_dir():
        return False
    return has_index_table(connect(uri, storage_options))


def has_index_table(db) -> bool:
    """Whether the LanceDB database `db` holds the index's table (its table listing is paged)."""
    page_token = None
    while True:
        page = db.list_tables(page_token=page_token)
        if TABLE_NAME in page.tables:
            return True
        page_token = page.page_token
        if not page_token:
            return False


def _is_local(uri) -> bool:
    return "://" not in str(uri)


def _check_not_legacy(uri) -> None:
    if _is_local(uri) and (Path(uri) / LEGACY_CURRENT_FILE).is_file():
        raise ValueError(
            f"{uri} is a clara-index/1 folder (safetensors shards); convert it once with "
            f"`clara index convert {uri} --output-dir NEW_INDEX` and use NEW_INDEX"
        )


# ----------------------------------------------------------------------------------------------------------------
# The index


class ClaraIndex:
    """Compressed documents of a corpus in a LanceDB table, searched by CLaRa's query reasoner.

    Build with [`ClaraIndex.build`], open with [`ClaraIndex.load`]; `model.answer(question, index=index)` answers
    from the top `generation_top_k` documents. `table` is the LanceDB table itself, for anything this class does not
    wrap (versions, compaction, SQL filters).
    """

    def __init__(self, table, model: ClaraForRAG | None = None, refresh_interval: float | None = None,
                 exact_cache_bytes: int = DEFAULT_EXACT_CACHE_BYTES, search_backend: str = "lance",
                 faiss_factory: str = DEFAULT_FAISS_FACTORY):
        if search_backend not in SEARCH_BACKENDS:
            raise ValueError(f"search_backend={search_backend!r} is not one of {SEARCH_BACKENDS}")
        if search_backend == "faiss":
            _import_faiss()
        self.table, self.model, self.refresh_interval = table, model, refresh_interval
        self.exact_cache_bytes, self._cache = exact_cache_bytes, None
        self.search_backend, self.faiss_factory, self._faiss = search_backend, faiss_factory, None
        self._checked_at = time.monotonic()
        metadata = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{table.uri}: format {metadata.get('format')!r}, expected {INDEX_FORMAT!r}")
        self.fingerprint, self.memory_dtype = metadata["fingerprint"], metadata["memory_dtype"]
        self.model_name = metadata.get("model") or (str(model.name_or_path) if model is not None else None)

    @property
    def uri(self) -> str:
        return self.table.uri

    @property
    def version(self) -> int:
        """The table version this index reads."""
        return self.table.version

    # -- building -------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model: ClaraForRAG, corpus, batch_size: int = 8, output_dir: str | os.PathLike | None = None,
              commit_rows: int = DEFAULT_COMMIT_ROWS, overwrite: bool = False, memory_dtype: str | None = None,
              storage_options: dict | None = None) -> "ClaraIndex":
        """Compress a corpus into an index.

        Args:
            corpus: Texts, a `datasets.Dataset` or a JSONL path (see [`read_corpus`]).
            output_dir: The index URI (a folder or an object-store prefix); in memory without it. Documents are
                appended in commits of `commit_rows`; a build run again on the same URI with the same model skips
                the ids already there, so a killed build resumes and no document is stored twice. Under
                `accelerate launch` / `torchrun` each process compresses every n-th chunk and appends it to the one
                table (any number of machines, when the URI is object storage they all reach).
            overwrite: Replace a table already at `output_dir` (one commit: readers keep the old version until
                they refresh) instead of adding the missing documents to it.
            memory_dtype: `"float32"` or `"float16"` storage; the model's dtype when it is float16, else float32
                (bfloat16 memory is stored exactly in float32).
        """
        check_positive("batch_size", batch_size)
        check_positive("commit_rows", commit_rows)
        documents = read_corpus(corpus)
        memory_dtype = memory_dtype or ("float16" if model.dtype == torch.float16 else "float32")
        if memory_dtype not in ("float32", "float16"):
            raise ValueError(f"memory_dtype={memory_dtype!r} must be 'float32' or 'float16'")
        schema = index_schema(compressor_fingerprint(model), str(model.name_or_path), memory_dtype)
        state = distributed_state()
        if output_dir is None:
            if state.num_processes > 1:
                raise ValueError("a data-parallel build needs output_dir (an index URI every process can write)")
            table = connect("memory://").create_table(TABLE_NAME, schema=schema)
            table.add(_compressed_batches(model, schema, documents, batch_size))  # one commit
            return cls(table, model)

        _check_not_legacy(output_dir)
        if state.is_main_process:
            cls._create_table(output_dir, schema, model, overwrite, storage_options)
        state.wait_for_everyone()
        table = connect(output_dir, storage_options).open_table(TABLE_NAME)
        done = set(_column(table, "id"))
        chunks = range(0, len(documents), commit_rows)
        for n, start in enumerate(chunks):
            if n % state.num_processes != state.process_index:
                continue
            chunk = documents.select(range(start, min(start + commit_rows, len(documents))))
            todo = [i for i, doc_id in enumerate(chunk["id"]) if doc_id not in done]
            if not todo:
                continue
            logger.info(f"process {state.process_index}: compressing chunk {n + 1}/{len(chunks)} "
                        f"(documents {start}-{start + len(chunk) - 1}, {len(todo)} not yet indexed)")
            table.add(_compressed_batches(model, schema, chunk.select(todo), batch_size))
        state.wait_for_everyone()
        return cls.load(output_dir, model=model, storage_options=storage_options)

    @staticmethod
    def _create_table(uri, schema: pa.Schema, model: ClaraForRAG, overwrite: bool, storage_options) -> None:
        db = connect(uri, storage_options)
        if has_index_table(db) and not overwrite:
            existing = db.open_table(TABLE_NAME)
            check_fingerprint(_table_fingerprint(existing), model, str(uri))
            logger.warning(f"{uri}: adding the corpus's missing documents to the index there "
                           f"({existing.count_rows()} documents already)")
            return
        db.create_table(TABLE_NAME, schema=schema, mode="overwrite" if overwrite else "create")

    def add(self, corpus, batch_size: int = 8) -> None:
        """Compress and append documents (ids must be new), in one commit."""
        new = read_corpus(corpus, first_id=len(self))
        present = self._present(list(new["id"]))
        if present:
            raise ValueError(f"document ids already in the index: {sorted(present)[:5]}")
        model = self._require_model("add")
        self.table.add(_compressed_batches(model, self.table.schema, new, batch_size))

    def delete(self, ids: list[str] | str) -> None:
        """Remove documents by id, in one commit."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = sorted(set(ids) - self._present(ids))
        if missing:
            raise KeyError(f"document ids not in the index: {missing[:5]}")
        self.table.delete(f"id IN ({_sql_strings(ids)})")

    def texts(self, ids: list[str]) -> list[str]:
        """The texts of documents by id."""
        rows = self._rows_where_id(list(ids), ["id", "text"])
        by_id = dict(zip(rows["id"].to_pylist(), rows["text"].to_pylist()))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"document ids not in the index: {missing[:5]}")
        return [by_id[i] for i in ids]

    def ids(self) -> list[str]:
        """Every document id, in the table's order."""
        return _column(self.table, "id")

    def __len__(self) -> int:
        return self.table.count_rows()

    # -- search ---------------------------------------------------------------------------------------------------

    def search(self, questions: str | list[str], k: int = 10, nprobes: int = DEFAULT_NPROBES,
               refine_factor: int = DEFAULT_REFINE_FACTOR) -> SearchResult | list[SearchResult]:
        """The top-k documents for each question by the query reasoner's cosine similarity.

        Exact without a vector index; with one (or with `search_backend="faiss"`), `nprobes` partitions are searched
        and `k * refine_factor` candidates re-ranked on the stored memory. `k` larger than the documents returns all
        of them.
        """
        single = isinstance(questions, str)
        check_positive("k", k)
        model = self._require_model("search")
        if not model.has_query_reasoner:
            raise ValueError(
                f"searching an index needs a model with a query reasoner (this one has {model.adapter_names}); "
                "load a stage-3 (e2e) CLaRa"
            )
        results = self.search_embeddings(model.encode_queries(questions), k, nprobes, refine_factor)
        return results[0] if single else results

    def search_embeddings(self, query_reps: torch.Tensor, k: int = 10, nprobes: int = DEFAULT_NPROBES,
                          refine_factor: int = DEFAULT_REFINE_FACTOR) -> list[SearchResult]:
        """`search` for query embeddings already computed (`model.encode_queries`: `(n, n_mem * hidden)`)."""
        check_positive("k", k)
        check_positive("nprobes", nprobes)
        check_positive("refine_factor", refine_factor)
        width = self._memory_width()
        if query_reps.dim() != 2 or query_reps.shape[1] != width:
            raise ValueError(f"query_reps has shape {tuple(query_reps.shape)}; expected (n, {width})")
        self._refresh_if_due()
        k = min(k, len(self))
        if k == 0:
            raise ValueError("the index holds no documents")
        if self.search_backend == "faiss":
            candidates = self._faiss_candidates(query_reps, k, nprobes, refine_factor)
        elif self.has_vector_index():
            candidates = self._approximate_candidates(query_reps, k, nprobes, refine_factor)
        else:
            candidates = self._exact_candidates(query_reps, k)
        return [self._rescore(query, positions, k) for query, positions in zip(query_reps, candidates)]

    def embeddings(self, positions: list[int]) -> torch.Tensor:
        """`(len(positions), n_mem, hidden)` memory of rows (as `SearchResult.positions`)."""
        rows = self._take(positions, [MEMORY_COLUMN])
        return _memory_tensor(rows[MEMORY_COLUMN]).view(len(positions), *self._memory_shape())

    def _exact_candidates(self, query_reps: torch.Tensor, k: int) -> list[list[int]]:
        queries = F.normalize(query_reps.float().cpu(), dim=-1)  # scored where the rows are read
        if len(self) * self._memory_width() * 4 <= self.exact_cache_bytes:
            positions, normalised = self._cached_memory()
            return positions[(queries @ normalised.T).topk(k, dim=1).indices].tolist()
        best_scores = torch.full((len(queries), 0), float("-inf"))
        best_positions = torch.zeros((len(queries), 0), dtype=torch.long)
        for positions, flat, norms in self._memory_batches():
            scores = (queries @ flat.T) / norms.clamp_min(1e-12)
            merged = torch.cat([best_scores, scores], dim=1)
            top = merged.topk(min(k, merged.shape[1]), dim=1)
            best_scores = top.values
            best_positions = torch.cat([best_positions, positions.expand(len(queries), -1)], dim=1).gather(1, top.indices)
        return best_positions.tolist()

    def _memory_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`(row ids, memory (rows, n_mem * hidden) in float32, norms)` of the table, batch by batch."""
        scan = self.table.search().select([MEMORY_COLUMN, "norm"]).with_row_id(True).limit(None)
        for batch in scan.to_batches(SEARCH_CHUNK_ROWS):
            yield (torch.from_numpy(batch.column("_rowid").to_numpy().astype(np.int64)),
                   _memory_tensor(batch.column(MEMORY_COLUMN)).float(),
                   torch.from_numpy(batch.column("norm").to_numpy().copy()))

    def _cached_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids and L2-normalised memory of the whole table, read once per table version."""
        if self._cache is None or self._cache[0] != self.version:
            self._cache = None  # the previous version's copy goes before the next one is read
            rows = len(self)
            positions, normalised = torch.empty(rows, dtype=torch.long), torch.empty(rows, self._memory_width())
            filled = 0
            for batch_positions, flat, norms in self._memory_batches():
                stop = filled + len(batch_positions)
                positions[filled:stop] = batch_positions
                torch.div(flat, norms.clamp_min(1e-12).unsqueeze(1), out=normalised[filled:stop])
                filled = stop
            self._cache = (self.version, positions[:filled], normalised[:filled])
        return self._cache[1], self._cache[2]

    def _approximate_candidates(self, query_reps: torch.Tensor, k: int, nprobes: int, refine_factor: int) -> list[list[int]]:
        vectors = query_reps.float().cpu().numpy()
        found = (self.table.search(list(vectors), vector_column_name=MEMORY_COLUMN).distance_type("cosine")
                 .nprobes(nprobes).refine_factor(refine_factor).limit(k).select(["_distance"]).with_row_id(True)
                 .to_arrow())
        if len(vectors) == 1:  # one query vector comes back without a query_index column
            return [found["_rowid"].to_pylist()]
        by_query = [[] for _ in vectors]
        for query, row in zip(found["query_index"].to_pylist(), found["_rowid"].to_pylist()):
            by_query[query].append(row)
        return by_query

    def _faiss_candidates(self, query_reps: torch.Tensor, k: int, nprobes: int, refine_factor: int) -> list[list[int]]:
        faiss_index = self._faiss_index()
        _import_faiss().extract_index_ivf(faiss_index).nprobe = nprobes
        queries = F.normalize(query_reps.float().cpu(), dim=-1).numpy()
        _, found = faiss_index.search(queries, k * refine_factor)
        return [[int(row) for row in rows if row >= 0] for rows in found]  # -1: fewer candidates than asked

    def _faiss_index(self):
        """The FAISS index over this version's memory (normalised, inner product, Lance row ids), built once per version."""
        if self._faiss is None or self._faiss[0] != self.version:
            self._faiss = None  # the previous version's index goes before the next one is built
            self._faiss = (self.version, self._build_faiss_index())
        return self._faiss[1]

    def _build_faiss_index(self):
        faiss = _import_faiss()
        rows, width = len(self), self._memory_width()
        factory = self.faiss_factory.format(n_list=_default_partitions(rows), pq_m=_default_sub_vectors(width))
        try:
            faiss_index = faiss.index_factory(width, factory, faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(faiss_index)
        except RuntimeError as error:
            raise ValueError(f"faiss_factory={self.faiss_factory!r} ({factory!r}) is not an IVF index FAISS builds: "
                             f"{str(error).strip().splitlines()[-1]}") from error
        n_list = faiss.extract_index_ivf(faiss_index).nlist
        sample = np.random.default_rng(0).choice(rows, min(rows, max(FAISS_TRAIN_ROWS_PER_LIST * n_list, FAISS_MIN_TRAIN_ROWS)),
                                                 replace=False)
        logger.info(f"building FAISS {factory} over {rows} memories of {self.uri} (version {self.version})")
        training = self.table.take_offsets(np.sort(sample).tolist()).select([MEMORY_COLUMN]).to_arrow()[MEMORY_COLUMN]
        faiss_index.train(F.normalize(_memory_tensor(training).float(), dim=-1).numpy())
        del training
        with logging.tqdm(total=rows, desc="FAISS index", unit="memories", disable=rows < SEARCH_CHUNK_ROWS) as bar:
            for positions, flat, norms in self._memory_batches():
                faiss_index.add_with_ids((flat / norms.clamp_min(1e-12).unsqueeze(1)).numpy(), positions.numpy())
                bar.update(len(positions))
        return faiss_index

    def _rescore(self, query: torch.Tensor, positions: list[int], k: int) -> SearchResult:
        # CLaRa's own cosine (the function `retrieve` uses), so scores and order equal `model.retrieve` on these docs.
        rows = self._take(positions, ["id", "text", MEMORY_COLUMN])
        candidates = _memory_tensor(rows[MEMORY_COLUMN]).view(len(positions), *self._memory_shape())
        scores = cosine_scores(query.unsqueeze(0), candidates.to(device=query.device, dtype=query.dtype).unsqueeze(0))[0]
        top = scores.topk(min(k, len(positions)))
        chosen = top.indices.tolist()
        ids, texts = rows["id"].to_pylist(), rows["text"].to_pylist()
        return SearchResult([ids[i] for i in chosen], top.values.tolist(), [texts[i] for i in chosen],
                            [positions[i] for i in chosen])

    # -- approximate search ---------------------------------------------------------------------------------------

    def create_vector_index(self, kind: str = "ivf_sq", num_partitions: int | None = None,
                            num_sub_vectors: int | None = None, hnsw_m: int = 20,
                            kmeans_sample_rate: int = DEFAULT_KMEANS_SAMPLE_RATE,
                            kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS, accelerator: str | None = None) -> None:
        """Build LanceDB's approximate index on the memory column (cosine), in one commit.

        Rows added later are searched exactly beside it until the index is built again (or `table.optimize()`).

        Args:
            kind: `"ivf_sq"` (8-bit scalar codes, one byte per value, scanned in each probed partition: the
                default, measured at 100k and 1M memories of the shipped shape with recall@10 0.999 and half the
                build CPU of IVF_HNSW_SQ, docs/index-sizing.md), `"ivf_hnsw_sq"` (the same codes with a graph per
                partition: a search visits part of a partition, for more queries per second where a machine with
                the RAM and CPU for its build is available), or `"ivf_pq"` (inverted lists of product-quantised
                codes: 32x smaller, for corpora whose codes must fit in RAM, around 100M passages).
            num_partitions: IVF partitions; default about sqrt(rows).
            num_sub_vectors: PQ codes per vector (bytes, at 8 bits); must divide n_mem * hidden. Default: one per
                32 values (see docs/index-sizing.md).
            kmeans_sample_rate: rows per partition that the partitions' k-means trains on (LanceDB's `sample_rate`).
            kmeans_iterations: k-means iterations (LanceDB's `max_iterations`). Their defaults keep the training a
                small part of the build, where LanceDB's (256 and 50) grow with rows x partitions x width (about 120
                TFLOP at 1M rows of the shipped width); recall measured with them in docs/index-sizing.md.
            accelerator: `"cuda"` trains the partitions and codebooks on the GPU (LanceDB's option; for millions of rows).
        """
        from lancedb.index import HnswSq, IvfPq, IvfSq

        if kind not in VECTOR_INDEX_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {VECTOR_INDEX_KINDS}")
        for name, value in (("kmeans_sample_rate", kmeans_sample_rate), ("kmeans_iterations", kmeans_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        training = {"sample_rate": kmeans_sample_rate, "max_iterations": kmeans_iterations, "accelerator": accelerator}
        rows = len(self)
        width = self._memory_width()
        num_partitions = num_partitions or _default_partitions(rows)
        if kind == "ivf_pq":
            num_sub_vectors = num_sub_vectors or _default_sub_vectors(width)
            if width % num_sub_vectors:
                raise ValueError(f"num_sub_vectors={num_sub_vectors} must divide the memory width {width}")
            config = IvfPq(distance_type="cosine", num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                           num_bits=8 if rows >= 256 else 4, **training)
        elif kind == "ivf_sq":
            config = IvfSq(distance_type="cosine", num_partitions=num_partitions, **training)
        else:
            config = HnswSq(distance_type="cosine", num_partitions=num_partitions, m=hnsw_m, **training)
        self.table.create_index(MEMORY_COLUMN, config=config, replace=True)

    def has_vector_index(self) -> bool:
        return any(MEMORY_COLUMN in config.columns for config in self.table.list_indices())

    # -- saving and loading ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, storage_options: dict | None = None) -> None:
        """Write a copy of this index's documents to the URI `path`, replacing any index there in one commit.

        An index loaded from a URI needs no save: each of its writes is already committed there.
        """
        _check_not_legacy(path)
        database = str(self.uri).rstrip("/").rsplit("/", 1)[0]  # the URI the table was opened from
        if str(path).rstrip("/") == database or (_is_local(path) and os.path.abspath(path) == os.path.abspath(database)):
            return
        scan = self.table.search().select(["id", "text", MEMORY_COLUMN, "norm"]).limit(None).to_batches(SEARCH_CHUNK_ROWS)
        reader = pa.RecordBatchReader.from_batches(self.table.schema, (b.cast(self.table.schema) for b in scan))
        connect(path, storage_options).create_table(TABLE_NAME, reader, schema=self.table.schema, mode="overwrite")
        logger.info(f"saved index of {len(self)} documents to {path}")

    @classmethod
    def load(cls, path: str | os.PathLike, model: ClaraForRAG | None = None,
             refresh_interval: float | None = DEFAULT_REFRESH_SECONDS, storage_options: dict | None = None,
             exact_cache_bytes: int = DEFAULT_EXACT_CACHE_BYTES, search_backend: str = "lance",
             faiss_factory: str = DEFAULT_FAISS_FACTORY) -> "ClaraIndex":
        """Open the index at the URI `path`. With `model`, check that it compresses as the index's builder did.

        Args:
            refresh_interval: Seconds between `search`'s checks for a newer table version written by another
                process; `None` reads the version opened until `refresh()`.
            exact_cache_bytes: Exact search keeps the memory column in RAM (float32, read once per version) when it
                is at most this large, and streams it from the table on every search otherwise.
            search_backend: `"lance"`: exact search, or LanceDB's vector index once there is one. `"faiss"` (the
                `faiss` extra): a FAISS index of `faiss_factory` built in this process's RAM from the table on the
                first search of each table version, proposing `k * refine_factor` candidates from `nprobes` lists;
                for one process serving a corpus whose vectors fit its RAM (IVF-Flat: 4 bytes per memory value;
                `"IVF{n_list},PQ{pq_m}"`: one byte per 32), see docs/index-sizing.md.
        """
        _check_not_legacy(path)
        if not index_exists(path, storage_options):
            raise FileNotFoundError(f"{path} is not a CLaRa index (no {TABLE_NAME} table)")
        index = cls(connect(path, storage_options).open_table(TABLE_NAME), refresh_interval=refresh_interval,
                    exact_cache_bytes=exact_cache_bytes, search_backend=search_backend, faiss_factory=faiss_factory)
        if model is not None:
            index.attach_model(model)
        return index

    def refresh(self) -> None:
        """Read the newest version of the table (documents added or deleted by other processes)."""
        self.table.checkout_latest()
        self._checked_at = time.monotonic()

    def attach_model(self, model: ClaraForRAG) -> None:
        """Use `model` for search and add; it must compress as the index's builder did."""
        check_fingerprint(self.fingerprint, model, str(self.uri))
        self.model = model

    # -- helpers --------------------------------------------------------------------------------------------------

    def _refresh_if_due(self) -> None:
        if self.refresh_interval is not None and time.monotonic() - self._checked_at >= self.refresh_interval:
            self.refresh()

    def _require_model(self, action: str) -> ClaraForRAG:
        if self.model is None:
            raise ValueError(f"{action} needs a model: ClaraIndex.load(path, model=...) or index.attach_model(model)")
        return self.model

    def _memory_width(self) -> int:
        return self.fingerprint["n_mem_tokens"] * self.fingerprint["hidden_size"]

    def _memory_shape(self) -> tuple[int, int]:
        return self.fingerprint["n_mem_tokens"], self.fingerprint["hidden_size"]

    def _take(self, positions: list[int], columns: list[str]) -> dict:
        """Columns of rows by row id, in the order asked."""
        if not positions:
            return {c: pa.array([], self.table.schema.field(c).type) for c in columns}
        rows = self.table.take_row_ids([int(p) for p in positions]).select(columns).with_row_id().to_arrow()
        where = {row: i for i, row in enumerate(rows["_rowid"].to_pylist())}
        missing = [p for p in positions if p not in where]
        if missing:
            raise IndexError(f"rows {missing[:5]} are not in version {self.version} of {self.uri}")
        order = pa.array([where[p] for p in positions])
        return {c: rows[c].take(order).combine_chunks() for c in columns}

    def _rows_where_id(self, ids: list[str], columns: list[str]) -> pa.Table:
        if not ids:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        return self.table.search().where(f"id IN ({_sql_strings(ids)})").select(columns).limit(None).to_arrow()

    def _present(self, ids: list[str]) -> set[str]:
        return set(self._rows_where_id(ids, ["id"])["id"].to_pylist())


def _table_fingerprint(table) -> dict:
    """The compressor fingerprint recorded in a table's metadata."""
    return json.loads(table.schema.metadata[METADATA_KEY])["fingerprint"]


def _compressed_batches(model: ClaraForRAG, schema: pa.Schema, documents: datasets.Dataset,
                        batch_size: int) -> pa.RecordBatchReader:
    """Documents compressed as the table reads them: one Lance write, however many batches."""

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, len(documents), ROWS_PER_ARROW_BATCH):
            rows = documents[start : start + ROWS_PER_ARROW_BATCH]
            embeds = model.compress(rows["text"], batch_size=batch_size, show_progress_bar=len(documents) > ROWS_PER_ARROW_BATCH)
            yield memory_batch(schema, rows["id"], rows["text"], embeds)

    return pa.RecordBatchReader.from_batches(schema, batches())


def _memory_tensor(column: pa.Array | pa.ChunkedArray) -> torch.Tensor:
    """`(rows, width)` tensor of a fixed-size-list memory column (zero-copy where Arrow allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    if not values.flags.writeable:  # Arrow's buffers are read-only; torch wants to own what it may write
        values = values.copy()
    return torch.from_numpy(values.reshape(-1, width))


def _column(table, name: str) -> list:
    return table.search().select([name]).limit(None).to_arrow()[name].to_pylist()


def _sql_strings(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _default_partitions(rows: int) -> int:
    """About sqrt(rows) inverted lists, each with at least 64 rows to train its centroid on."""
    return max(1, min(round(rows**0.5), rows // 64 or 1))


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("search_backend='faiss' needs FAISS: pip install 'clara-hf[faiss]' (faiss-cpu), "
                          "or faiss-gpu") from error
    return faiss


def _default_sub_vectors(width: int) -> int:
    target = max(1, width // 32)
    return max(d for d in range(1, target + 1) if width % d == 0)


def _documents_digests(ids: list[str], texts: list[str]) -> dict[str, str]:
    return {i: hashlib.sha256(t.encode()).hexdigest() for i, t in zip(ids, texts)}


def open_or_build_index(model: ClaraForRAG, corpus=None, index_dir: str | os.PathLike | None = None,
                        batch_size: int = 8, search_backend: str = "lance") -> ClaraIndex:
    """The index of `corpus` for `model`, kept at `index_dir`: the one cache policy of every job that indexes a corpus.

    The index at `index_dir` is reused when `model` compresses as its builder did and (with `corpus`) it holds exactly
    the corpus's documents, ids and texts. When it holds a part of them (an interrupted build) the build resumes;
    otherwise the corpus is compressed into `index_dir` again, with a warning saying why. Without `index_dir` the index
    is built in memory.

    Args:
        corpus: Texts, a `datasets.Dataset`, a JSONL path or `"shipped"` (see [`read_corpus`]). Without it, the index
            at `index_dir` is opened as it is.
        index_dir: A folder or object-store URI.
        search_backend: Who proposes candidates (see [`ClaraIndex.load`]).
    Raises:
        `ValueError`: neither argument given, or only `index_dir`, whose index another compressor built.
        `FileNotFoundError`: only `index_dir`, and it holds no index.
    """
    if corpus is None and index_dir is None:
        raise ValueError("open_or_build_index needs a corpus, an index_dir, or both")
    index = _open_or_build_index(model, corpus, index_dir, batch_size)
    if search_backend == "lance":
        return index
    return ClaraIndex(index.table, model=model, refresh_interval=index.refresh_interval, search_backend=search_backend)


def _open_or_build_index(model: ClaraForRAG, corpus, index_dir, batch_size: int) -> ClaraIndex:
    documents = None if corpus is None else read_corpus(corpus)
    overwrite = False
    if index_dir is not None and (corpus is None or index_exists(index_dir)):
        try:
            index = ClaraIndex.load(index_dir, model=model)
        except ValueError as error:  # another compressor built it
            if documents is None:
                raise
            logger.warning(f"rebuilding {index_dir}: {error}")
            overwrite = True
        else:
            if documents is None:
                return index
            rows = index.table.search().select(["id", "text"]).limit(None).to_arrow()
            stored = _documents_digests(rows["id"].to_pylist(), rows["text"].to_pylist())
            wanted = _documents_digests(documents["id"], documents["text"])
            if stored == wanted:
                return index
            if stored.items() <= wanted.items():
                logger.warning(f"{index_dir} holds {len(stored)} of the corpus's {len(wanted)} documents; resuming its build")
            else:
                logger.warning(f"rebuilding {index_dir}: it holds other documents than the corpus given")
                overwrite = True
    elif index_dir is not None:
        logger.info(f"first run: building the index of {len(documents)} documents at {index_dir} (later runs reuse it)")
    return ClaraIndex.build(model, documents, batch_size=batch_size, output_dir=index_dir, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# clara-index/1 folders


def convert_legacy_index(source: str | os.PathLike, output_dir: str | os.PathLike, storage_options: dict | None = None,
                         overwrite: bool = False) -> ClaraIndex:
    """Copy a clara-index/1 folder (`CURRENT`, version folders, safetensors shards) into a LanceDB index at `output_dir`.

    The stored embeddings are copied as they are (nothing is compressed again); deleted documents are left out; a
    FAISS file there is not carried over (build a vector index with `create_vector_index`).
    """
    from safetensors import safe_open

    root = Path(source)
    current = root / LEGACY_CURRENT_FILE
    if not current.is_file():
        raise FileNotFoundError(f"{root} is not a clara-index/1 folder (no {LEGACY_CURRENT_FILE} file)")
    folder = root / current.read_text().strip()
    metadata = json.loads((folder / "index.json").read_text())
    if metadata.get("format") != "clara-index/1":
        raise ValueError(f"{folder / 'index.json'}: format {metadata.get('format')!r}, expected 'clara-index/1'")
    if index_exists(output_dir, storage_options) and not overwrite:
        raise ValueError(f"{output_dir} already holds an index; pass overwrite=True (--overwrite) to replace it")
    documents = datasets.load_from_disk(str(folder / "documents"))
    deleted = set(metadata["deleted"])
    dtype = "float16" if metadata.get("dtype") == "float16" else "float32"
    schema = index_schema(metadata["fingerprint"], metadata.get("model"), dtype)

    def batches() -> Iterator[pa.RecordBatch]:
        offset = 0
        for i, n in enumerate(metadata["shards"]):
            with safe_open(str(folder / "shards" / f"shard-{i:05d}.safetensors"), framework="pt") as shard:
                embeddings = shard.get_slice("embeddings")
                for start in range(0, n, SEARCH_CHUNK_ROWS):
                    keep = [r for r in range(start, min(start + SEARCH_CHUNK_ROWS, n)) if offset + r not in deleted]
                    if keep:
                        rows = documents.select([offset + r for r in keep])
                        block = embeddings[start : min(start + SEARCH_CHUNK_ROWS, n)][[r - start for r in keep]]
                        yield memory_batch(schema, rows["id"], rows["text"], block)
            offset += n

    table = connect(output_dir, storage_options).create_table(
        TABLE_NAME, pa.RecordBatchReader.from_batches(schema, batches()), schema=schema, mode="overwrite")
    logger.info(f"converted {root} ({table.count_rows()} documents) into {output_dir}")
    return ClaraIndex.load(output_dir, storage_options=storage_options)
