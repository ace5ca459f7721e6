"""ClaraIndex on LanceDB: build / save / load / add / delete / search, fingerprints, vector indexes, atomic commits,
resumable and data-parallel builds, refresh across processes and servers, clara-index/1 conversion, and the
`clara index` / `clara ask` CLI, on tiny random CLaRa models."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import DATA_DIR, make_tiny_clara

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.cli import main as clara_main
from modeling_clara.corpus import read_corpus
from modeling_clara.fingerprint import compressor_weights, weights_sha256
from modeling_clara.index import DEFAULT_REFRESH_SECONDS, VECTOR_INDEX_KINDS, compressor_fingerprint, open_or_build_index

REPO_DIR = Path(__file__).resolve().parents[1]


def real_passages(n: int) -> list[str]:
    """Distinct passages from the evaluation data (read only, as a corpus)."""
    passages = []
    for line in open(DATA_DIR / "hotpotqa_dev.jsonl", encoding="utf-8"):
        for doc in json.loads(line)["docs"]:
            if doc not in passages:
                passages.append(doc)
            if len(passages) == n:
                return passages
    raise AssertionError("not enough passages")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return real_passages(12)


@pytest.fixture(scope="module")
def saved_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_clara")
    make_tiny_clara(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.fixture
def model(saved_model_dir) -> ClaraForRAG:
    return ClaraForRAG.from_pretrained(str(saved_model_dir))


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_DIR)}


def write_corpus(path: Path, texts: list[str], prefix: str | None = None) -> Path:
    rows = [({"id": f"{prefix}{i}"} if prefix is not None else {}) | {"text": t} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def memory_by_id(index: ClaraIndex) -> dict[str, torch.Tensor]:
    """Every stored memory by document id, read from the table itself."""
    rows = index.table.search().select(["id"]).with_row_id(True).limit(None).to_arrow()
    ids, positions = rows["id"].to_pylist(), rows["_rowid"].to_pylist()
    return dict(zip(ids, index.embeddings(positions)))


def test_exact_search_equals_model_retrieve_over_the_corpus(model, corpus):
    index = ClaraIndex.build(model, corpus, batch_size=5)
    questions = ["Who founded the company?", "When was the film released?"]
    results = index.search(questions, k=4)
    scores, positions = model.retrieve(questions, [model.compress(corpus)] * 2, k=4)
    for result, expected_scores, expected_positions in zip(results, scores, positions):
        assert result.positions == expected_positions.tolist()  # one commit, one fragment: row ids are corpus positions
        assert result.ids == [str(p) for p in expected_positions.tolist()]
        assert result.texts == [corpus[p] for p in expected_positions.tolist()]
        torch.testing.assert_close(torch.tensor(result.scores), expected_scores)
    # Streamed batch by batch instead of read once into RAM: the same hits.
    assert ClaraIndex(index.table, model, exact_cache_bytes=0).search(questions, k=4) == results


def test_corpus_inputs_agree_and_ids_are_kept(model, corpus, tmp_path):
    path = write_corpus(tmp_path / "corpus.jsonl", corpus, prefix="doc-")
    from_list = ClaraIndex.build(model, corpus)
    from_jsonl = ClaraIndex.build(model, str(path))
    from_dataset = ClaraIndex.build(model, datasets.Dataset.from_dict({"contents": corpus}))
    assert from_jsonl.ids() == [f"doc-{i}" for i in range(len(corpus))]
    torch.testing.assert_close(from_list.embeddings(list(range(len(corpus)))), from_jsonl.embeddings(list(range(len(corpus)))))
    assert from_dataset.search("a question", k=3).positions == from_list.search("a question", k=3).positions


def test_save_load_round_trip_reads_the_table_and_is_identical(model, corpus, tmp_path):
    index = ClaraIndex.build(model, corpus)
    index.save(tmp_path / "idx")
    loaded = ClaraIndex.load(tmp_path / "idx", model=model)
    assert Path(loaded.uri).is_relative_to(tmp_path / "idx")  # read from the table on disk, not the one in memory
    positions = list(range(len(corpus)))
    torch.testing.assert_close(loaded.embeddings(positions), index.embeddings(positions), rtol=0, atol=0)
    assert loaded.search("Where is it?", k=5) == index.search("Where is it?", k=5)
    assert loaded.model_name == str(model.name_or_path)
    version = loaded.version
    loaded.save(tmp_path / "idx")  # its writes are committed there already: nothing to write
    assert ClaraIndex.load(tmp_path / "idx").version == version
    torch.testing.assert_close(loaded.embeddings([3, 0]), model.compress([corpus[3], corpus[0]]), rtol=1e-4, atol=1e-5)


def test_answer_from_the_index_equals_answer_from_the_retrieved_embeddings(model, corpus):
    index = ClaraIndex.build(model, corpus)
    question = "Who wrote the novel?"
    out = model.answer(question, index=index, return_dict=True)
    hits = index.search(question, k=model.config.generation_top_k)
    assert out["doc_indices"] == hits.ids
    assert out["answer"] == model.answer(question, index.embeddings(hits.positions), k=len(hits.positions))


def test_add_and_delete_are_commits_seen_after_loading(model, corpus, tmp_path):
    index = ClaraIndex.build(model, corpus[:8], output_dir=tmp_path / "idx")
    version = index.version
    index.add(corpus[8:])
    assert index.version == version + 1  # one add, one commit
    assert index.ids() == [str(i) for i in range(12)]
    stored = memory_by_id(index)
    torch.testing.assert_close(torch.stack([stored["9"], stored["10"]]), model.compress(corpus[9:11]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(datasets.Dataset.from_dict({"id": ["3"], "text": ["another text"]}))
    assert index.version == version + 1

    everything = index.search("Which team won?", k=12)
    gone = everything.ids[:3]
    index.delete(gone)
    assert len(index) == 9 and index.version == version + 2
    loaded = ClaraIndex.load(tmp_path / "idx", model=model)
    remaining = loaded.search("Which team won?", k=12)
    assert len(remaining.ids) == 9 and not set(gone) & set(remaining.ids)
    assert remaining.ids == everything.ids[3:]
    assert remaining.scores == pytest.approx(everything.scores[3:], abs=1e-6)
    with pytest.raises(KeyError, match=gone[0]):
        loaded.delete([gone[0]])
    with pytest.raises(KeyError, match=gone[1]):
        loaded.texts([gone[1]])


def test_a_reader_sees_another_writers_commits_after_refresh(model, corpus, tmp_path):
    ClaraIndex.build(model, corpus[:6], output_dir=tmp_path / "idx")
    pinned = ClaraIndex.load(tmp_path / "idx", model=model, refresh_interval=None)
    following = ClaraIndex.load(tmp_path / "idx", model=model, refresh_interval=0)
    writer = ClaraIndex.load(tmp_path / "idx", model=model)
    writer.add(datasets.Dataset.from_dict({"id": ["new"], "text": [corpus[7]]}))
    writer.delete(["0"])
    assert "new" not in pinned.search("Who?", k=12).ids and "0" in pinned.search("Who?", k=12).ids  # its version
    assert "new" in following.search("Who?", k=12).ids and "0" not in following.search("Who?", k=12).ids
    pinned.refresh()
    assert pinned.version == writer.version and sorted(pinned.search("Who?", k=12).ids) == sorted(writer.ids())


def test_an_index_refuses_a_model_that_compresses_differently(model, corpus, tiny_llama_dir, tmp_path):
    ClaraIndex.build(model, corpus).save(tmp_path / "idx")
    other = make_tiny_clara(tiny_llama_dir, seed=1)
    with pytest.raises(ValueError, match="compressor_sha256"):
        ClaraIndex.load(tmp_path / "idx", model=other)
    with pytest.raises(ValueError, match="compr_rate"):
        ClaraIndex.load(tmp_path / "idx", model=make_tiny_clara(tiny_llama_dir, compr_rate=4))
    with pytest.raises(ValueError, match="compressor_sha256"):  # nor does a build append another compressor's rows
        ClaraIndex.build(other, corpus, output_dir=tmp_path / "idx")
    # The decoder and query reasoner are not part of the fingerprint: a stage-3 fine-tune keeps the index valid.
    same_compressor = ClaraForRAG.from_pretrained(str(model.name_or_path))
    with torch.no_grad():
        for name, parameter in same_compressor.decoder.named_parameters():
            if "decoder_adapter" in name and "lora_B" in name:
                parameter.add_(1.0)
    ClaraIndex.load(tmp_path / "idx", model=same_compressor)


def test_the_compressor_fingerprint_hashes_the_encoder_adapter_and_added_rows_only(model, tiny_llama_dir):
    state = model.clara_state_dict()
    compressor = {k: v for k, v in state.items() if k.startswith("encoder_adapter.") or k.startswith("added_")}
    assert compressor.keys() == compressor_weights(model).keys() and len(compressor) > 2
    assert not any(k.startswith(("decoder_adapter.", "query_reasoner_adapter.")) for k in compressor)
    # The digest's definition, written out: names and float32 bytes in name order (indexes saved earlier stay valid).
    digest = hashlib.sha256()
    for key in sorted(compressor):
        digest.update(key.encode())
        digest.update(compressor[key].float().numpy().tobytes())
    assert compressor_fingerprint(model)["compressor_sha256"] == digest.hexdigest()
    assert weights_sha256(dict(reversed(list(compressor.items())))) == digest.hexdigest()  # dict order is irrelevant
    changed = {**compressor, next(iter(compressor)): next(iter(compressor.values())) + 1e-3}
    assert weights_sha256(changed) != digest.hexdigest()
    other = make_tiny_clara(tiny_llama_dir, seed=1)
    assert compressor_fingerprint(other)["compressor_sha256"] != digest.hexdigest()


def test_open_or_build_index_reuses_an_index_only_for_the_same_compressor_and_corpus(
    model, corpus, tiny_llama_dir, tmp_path, caplog
):
    index_dir = tmp_path / "idx"
    built = open_or_build_index(model, corpus[:6], index_dir)
    version = built.version
    reused = open_or_build_index(model, corpus[:6], index_dir)
    assert reused.version == version  # loaded, not written again
    assert {k: v.tolist() for k, v in memory_by_id(reused).items()} == {k: v.tolist() for k, v in memory_by_id(built).items()}
    # Without a corpus the index is opened as it is.
    assert open_or_build_index(model, index_dir=index_dir).texts([str(i) for i in range(6)]) == corpus[:6]

    # A corpus that extends the stored one: the build resumes, compressing only the new documents.
    compressed = []
    compress = model.compress
    model.compress = lambda texts, **kw: compressed.extend(texts) or compress(texts, **kw)
    with caplog.at_level("WARNING", logger="modeling_clara.index"):
        extended = open_or_build_index(model, corpus[:7], index_dir)
    del model.compress
    assert "resuming" in caplog.text and compressed == corpus[6:7] and len(extended) == 7

    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_clara.index"):
        other_corpus = open_or_build_index(model, corpus[1:7], index_dir)
    assert "other documents" in caplog.text and other_corpus.version > extended.version
    assert sorted(other_corpus.ids()) == sorted(str(i) for i in range(6))  # read_corpus numbers the new list from 0

    other_model = make_tiny_clara(tiny_llama_dir, seed=1)
    version = other_corpus.version
    with pytest.raises(ValueError, match="compressor_sha256"):  # no corpus to rebuild from
        open_or_build_index(other_model, index_dir=index_dir)
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_clara.index"):
        rebuilt = open_or_build_index(other_model, corpus[:7], index_dir)
    assert "compressor_sha256" in caplog.text and rebuilt.version > version
    stored = memory_by_id(rebuilt)
    torch.testing.assert_close(torch.stack([stored[str(i)] for i in range(7)]), other_model.compress(corpus[:7]),
                               rtol=1e-4, atol=1e-5)


def test_open_or_build_index_names_what_is_missing(model, corpus, tmp_path):
    with pytest.raises(ValueError, match="needs a corpus, an index_dir, or both"):
        open_or_build_index(model)
    with pytest.raises(FileNotFoundError, match="not a CLaRa index"):
        open_or_build_index(model, index_dir=tmp_path / "nothing")
    in_memory = open_or_build_index(model, corpus[:3])
    assert len(in_memory) == 3 and in_memory.uri.startswith("memory://")


def test_the_shipped_corpus_is_a_corpus_name():
    shipped = read_corpus("shipped")
    assert len(shipped) > 0 and shipped[0]["text"].strip()
    assert list(shipped["id"]) == [json.loads(line)["id"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]


@pytest.mark.parametrize("kind", VECTOR_INDEX_KINDS)
def test_vector_index_candidates_are_rescored_exactly(model, kind, tmp_path):
    corpus = read_corpus("shipped")["text"][:80]  # enough rows to train the partitions and codebooks
    index = ClaraIndex.build(model, corpus, batch_size=16, output_dir=tmp_path / "idx")
    questions = ["Who directed it?", "What year?"]
    exact = index.search(questions, k=5)
    index.create_vector_index(kind, num_partitions=2)
    assert index.has_vector_index() and index.table.index_stats("memory_idx").index_type == kind.upper()
    approximate = index.search(questions, k=5, nprobes=2, refine_factor=16)
    for fast, slow in zip(approximate, exact):
        # Every partition probed and enough candidates re-ranked on the full memory: the exact ranking and scores.
        assert fast.ids == slow.ids
        assert fast.scores == pytest.approx(slow.scores, abs=1e-6)
    # Rows added after the vector index are searched exactly beside it.
    index.add(datasets.Dataset.from_dict({"id": ["late"], "text": [corpus[0]]}))
    assert "late" in index.search(questions[0], k=81, nprobes=2, refine_factor=16).ids
    expected = index.search(questions[1], k=5, nprobes=2, refine_factor=16)
    loaded = ClaraIndex.load(tmp_path / "idx", model=model)
    assert loaded.has_vector_index()
    alone = loaded.search(questions[1], k=5, nprobes=2, refine_factor=16)
    assert alone.ids == expected.ids and alone.scores == pytest.approx(expected.scores, abs=1e-6)


def test_faiss_backend_candidates_are_rescored_exactly(model, corpus, tmp_path, capsys):
    pytest.importorskip("faiss", reason="the faiss extra")
    ClaraIndex.build(model, corpus, batch_size=6, output_dir=tmp_path / "idx")
    exact = ClaraIndex.load(tmp_path / "idx", model=model)
    index = ClaraIndex.load(tmp_path / "idx", model=model, search_backend="faiss", faiss_factory="IVF2,Flat")
    questions = ["Who directed it?", "What year?"]
    # Both lists probed, so FAISS's own top 5 (inner products of normalised memory) are the exact top 5; re-scored,
    # they carry CLaRa's exact scores.
    for fast, slow in zip(index.search(questions, k=5, nprobes=2, refine_factor=1), exact.search(questions, k=5)):
        assert fast.ids == slow.ids
        assert fast.scores == pytest.approx(slow.scores, abs=1e-6)
    # A new table version (another writer's add) is searched after the refresh, by an index built for it.
    exact.add(datasets.Dataset.from_dict({"id": ["late"], "text": ["Who directed it? A late document."]}))
    index.refresh()
    assert index.search(questions[0], k=13, nprobes=2, refine_factor=1).ids == exact.search(questions[0], k=13).ids
    with pytest.raises(ValueError, match="IVF"):
        ClaraIndex.load(tmp_path / "idx", model=model, search_backend="faiss", faiss_factory="Flat").search("q", k=2)
    assert clara_main(["index", "search", str(tmp_path / "idx"), "Who directed it?", "-k", "3", "--backend", "faiss"]) == 0
    printed = [line.split("]")[0].split("[")[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == exact.search("Who directed it?", k=3).ids


def test_a_missing_faiss_names_the_extra(model, corpus, tmp_path, monkeypatch):
    ClaraIndex.build(model, corpus, output_dir=tmp_path / "idx")
    with pytest.raises(ValueError, match="search_backend"):
        ClaraIndex.load(tmp_path / "idx", search_backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets where faiss-cpu is not installed
    with pytest.raises(ImportError, match=r"clara-hf\[faiss\]"):
        ClaraIndex.load(tmp_path / "idx", search_backend="faiss")
    with pytest.raises(SystemExit, match=r"clara-hf\[faiss\]"):
        clara_main(["index", "search", str(tmp_path / "idx"), "Who?", "--backend", "faiss"])


def test_bad_arguments_are_named(model, corpus, tiny_llama_dir, tmp_path):
    index = ClaraIndex.build(model, corpus)
    with pytest.raises(ValueError, match="k"):
        index.search("q", k=0)
    with pytest.raises(ValueError, match="nprobes"):
        index.search("q", k=2, nprobes=0)
    with pytest.raises(ValueError, match="questions"):
        index.search(["  "], k=2)
    with pytest.raises(ValueError, match="corpus"):
        ClaraIndex.build(model, ["fine", ""])
    with pytest.raises(TypeError, match="corpus"):
        ClaraIndex.build(model, 42)
    with pytest.raises(ValueError, match="unique"):
        ClaraIndex.build(model, datasets.Dataset.from_dict({"id": [1, 1], "text": ["a", "b"]}))
    with pytest.raises(ValueError, match="memory_dtype"):
        ClaraIndex.build(model, corpus, memory_dtype="int8")
    with pytest.raises(ValueError, match="kind"):
        index.create_vector_index("faiss")
    with pytest.raises(ValueError, match="kmeans_sample_rate=0"):
        index.create_vector_index(kmeans_sample_rate=0)
    with pytest.raises(ValueError, match="kmeans_iterations=2.5"):
        index.create_vector_index(kmeans_iterations=2.5)
    with pytest.raises(ValueError, match="query reasoner"):
        ClaraIndex.build(make_tiny_clara(tiny_llama_dir, training_stage="stage1_2"), corpus).search("q", k=2)
    with pytest.raises(FileNotFoundError, match="not a CLaRa index"):
        ClaraIndex.load(tmp_path / "nothing")
    assert len(index.search("q", k=100).ids) == len(corpus)  # k above the corpus size returns every document


def test_float16_storage_keeps_the_ranking(model, corpus):
    exact = ClaraIndex.build(model, corpus).search("Who won?", k=5)
    half = ClaraIndex.build(model, corpus, memory_dtype="float16")
    assert half.table.schema.field("memory").type.value_type == "halffloat"
    assert half.search("Who won?", k=5).ids == exact.ids


def write_legacy_index(model, texts: list[str], root: Path, deleted: list[int]) -> None:
    """A clara-index/1 folder as that format laid it out: CURRENT, a version folder, safetensors shards, documents."""
    from safetensors.torch import save_file

    embeds = model.compress(texts)
    version = root / "v-0123456789ab"
    (version / "shards").mkdir(parents=True)
    for i, (start, stop) in enumerate([(0, 5), (5, len(texts))]):
        rows = embeds[start:stop].contiguous()
        save_file({"embeddings": rows, "norms": rows.flatten(start_dim=1).norm(dim=-1)},
                  str(version / "shards" / f"shard-{i:05d}.safetensors"))
    datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(len(texts))], "text": texts}).save_to_disk(str(version / "documents"))
    metadata = {"format": "clara-index/1", "fingerprint": compressor_fingerprint(model), "model": str(model.name_or_path),
                "dtype": "float32", "n_documents": len(texts), "shards": [5, len(texts) - 5], "deleted": deleted,
                "faiss": None}
    (version / "index.json").write_text(json.dumps(metadata))
    (root / "CURRENT").write_text(version.name + "\n")


def test_a_clara_index_1_folder_names_its_conversion_and_converts(model, corpus, tmp_path, capsys):
    write_legacy_index(model, corpus, tmp_path / "old", deleted=[2])
    with pytest.raises(ValueError, match=r"clara index convert .*old --output-dir"):
        ClaraIndex.load(tmp_path / "old", model=model)
    assert clara_main(["index", "convert", str(tmp_path / "old"), "--output-dir", str(tmp_path / "new")]) == 0
    assert "11 documents" in capsys.readouterr().out
    converted = ClaraIndex.load(tmp_path / "new", model=model)
    assert converted.ids() == [f"d{i}" for i in range(len(corpus)) if i != 2]
    kept = [t for i, t in enumerate(corpus) if i != 2]
    scores, positions = model.retrieve(["Who won?"], [model.compress(kept)], k=4)
    hits = converted.search("Who won?", k=4)
    assert hits.texts == [kept[p] for p in positions[0].tolist()]
    torch.testing.assert_close(torch.tensor(hits.scores), scores[0])


# ------------------------------------------------------------------------------------------------------------------
# Interrupted work and many processes: real subprocesses, SIGKILLed at the worst moment

KILL_DURING_ADD = """
import os, signal, sys
from modeling_clara import ClaraForRAG, ClaraIndex
import modeling_clara.index as index_module

model = ClaraForRAG.from_pretrained(sys.argv[1])
index = ClaraIndex.load(sys.argv[2], model=model)
index_module.ROWS_PER_ARROW_BATCH = 2  # the add streams several batches into its one write
compress, calls = model.compress, []

def compress_then_die(texts, **kwargs):
    calls.append(texts)
    if len(calls) == 2:  # the first batch is in Lance's hands, the commit is not
        os.kill(os.getpid(), signal.SIGKILL)
    return compress(texts, **kwargs)

model.compress = compress_then_die
index.add([f"New document {i} that the killed add must not publish." for i in range(5)])
"""


@pytest.mark.slow
def test_an_add_killed_before_its_commit_leaves_the_previous_version(saved_model_dir, model, corpus, tmp_path):
    index = ClaraIndex.build(model, corpus, output_dir=tmp_path / "idx")
    before, version = index.search("Who?", k=5), index.version
    process = subprocess.run([sys.executable, "-c", KILL_DURING_ADD, str(saved_model_dir), str(tmp_path / "idx")],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    after = ClaraIndex.load(tmp_path / "idx", model=model)
    assert after.version == version and len(after) == len(corpus) and after.search("Who?", k=5) == before
    after.add(["A document added after the crash."])  # the table takes writes again
    assert len(after) == len(corpus) + 1


KILL_DURING_BUILD = """
import os, signal, sys
from modeling_clara import ClaraForRAG, ClaraIndex

model = ClaraForRAG.from_pretrained(sys.argv[1])
compress, calls = model.compress, []

def compress_then_die(texts, **kwargs):
    calls.append(texts)
    if len(calls) == 3:  # chunks 1 and 2 are committed, chunk 3 dies compressing
        os.kill(os.getpid(), signal.SIGKILL)
    return compress(texts, **kwargs)

model.compress = compress_then_die
ClaraIndex.build(model, sys.argv[2], commit_rows=3, output_dir=sys.argv[3])
"""


@pytest.mark.slow
def test_a_killed_build_resumes_without_a_document_missing_or_twice(saved_model_dir, model, corpus, tmp_path):
    corpus_path = write_corpus(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "idx"
    process = subprocess.run([sys.executable, "-c", KILL_DURING_BUILD, str(saved_model_dir), str(corpus_path), str(out)],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert sorted(ClaraIndex.load(out).ids(), key=int) == [str(i) for i in range(6)]

    compressed = []
    compress = model.compress
    model.compress = lambda texts, **kw: compressed.extend(texts) or compress(texts, **kw)
    resumed = ClaraIndex.build(model, str(corpus_path), commit_rows=3, output_dir=out)
    del model.compress
    assert compressed == corpus[6:]  # chunks 1 and 2 (documents 0-5) were not compressed again
    assert sorted(resumed.ids(), key=int) == [str(i) for i in range(len(corpus))]  # each once
    stored = memory_by_id(resumed)
    torch.testing.assert_close(torch.stack([stored[str(i)] for i in range(len(corpus))]), compress(corpus), rtol=1e-4, atol=1e-5)


def launch_two_processes(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "modeling_clara.cli", *arguments]


@pytest.mark.slow
def test_data_parallel_build_with_two_processes_appends_to_one_table(saved_model_dir, model, corpus, tmp_path):
    corpus_path = write_corpus(tmp_path / "corpus.jsonl", corpus, prefix="d")
    out = tmp_path / "idx"
    command = launch_two_processes("index", "build", "--model", str(saved_model_dir), "--corpus", str(corpus_path),
                                   "--output-dir", str(out), "--commit-rows", "3")
    process = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO_DIR)
    assert process.returncode == 0, process.stderr[-3000:]
    # Chunks 1 and 3 on process 0, chunks 2 and 4 on process 1: each compressed once, by one process.
    for chunk, rank in ((1, 0), (2, 1), (3, 0), (4, 1)):
        assert process.stderr.count(f"compressing chunk {chunk}/4") == 1
        assert f"process {rank}: compressing chunk {chunk}/4" in process.stderr
    index = ClaraIndex.load(out, model=model)
    assert sorted(index.ids()) == sorted(f"d{i}" for i in range(len(corpus)))
    stored = memory_by_id(index)
    torch.testing.assert_close(torch.stack([stored[f"d{i}"] for i in range(len(corpus))]), model.compress(corpus),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_data_parallel_build_with_a_killed_process_resumes(saved_model_dir, tmp_path):
    texts = read_corpus("shipped")["text"][:60]
    corpus_path = write_corpus(tmp_path / "corpus.jsonl", texts, prefix="d")
    out = tmp_path / "idx"
    build = launch_two_processes("index", "build", "--model", str(saved_model_dir), "--corpus", str(corpus_path),
                                 "--output-dir", str(out), "--commit-rows", "2")
    launcher = subprocess.Popen(build, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, cwd=REPO_DIR)
    try:
        while not (out / "clara_index.lance").exists() or len(ClaraIndex.load(out, refresh_interval=None)) < 4:
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.05)
        workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        os.kill(int(workers[-1]), signal.SIGKILL)  # one worker dies mid-build; the launcher ends the other
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    partial = ClaraIndex.load(out).ids()
    assert len(partial) == len(set(partial)) < len(texts)
    resumed = subprocess.run(build, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO_DIR)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Each chunk is one commit, all or nothing: the rerun compresses exactly the chunks not committed.
    assert len(partial) % 2 == 0 and resumed.stderr.count("compressing chunk") == (len(texts) - len(partial)) // 2
    ids = ClaraIndex.load(out).ids()
    assert sorted(ids) == sorted(f"d{i}" for i in range(len(texts)))  # none missing, none twice


@pytest.mark.slow
def test_two_servers_on_one_table_see_an_add_after_their_refresh(saved_model_dir, model, corpus, tmp_path):
    pytest.importorskip("fastapi", reason='the serve extra: pip install "clara-hf[serve]"')
    from test_serving import running_server
    import requests

    ClaraIndex.build(model, corpus[:8], output_dir=tmp_path / "idx")
    arguments = ("--model", str(saved_model_dir), "--index", str(tmp_path / "idx"))
    # The second replica proposes candidates from its own FAISS index, which it must rebuild for the new version.
    with running_server(*arguments) as first, running_server(*arguments, "--index-backend", "faiss") as second:
        question = {"question": "Which team won the cup?", "k": 12}
        for server in (first, second):
            assert "new" not in [hit["id"] for hit in requests.post(f"{server}/v1/search", json=question, timeout=60).json()["documents"]]
        ClaraIndex.load(tmp_path / "idx", model=model).add(datasets.Dataset.from_dict({"id": ["new"], "text": [corpus[9]]}))
        time.sleep(DEFAULT_REFRESH_SECONDS + 0.5)  # each server checks for a newer version at most this often
        found = []
        for server in (first, second):
            hits = requests.post(f"{server}/v1/search", json=question, timeout=60).json()["documents"]
            assert "new" in [hit["id"] for hit in hits] and len(hits) == 9
            found.append([hit["id"] for hit in hits])
        assert found[0] == found[1]  # every candidate re-scored: the same exact ranking from either backend


def test_cli_build_search_add_delete_ask(saved_model_dir, corpus, tmp_path, capsys):
    corpus_path = write_corpus(tmp_path / "corpus.jsonl", corpus[:10], prefix="d")
    extra_path = write_corpus(tmp_path / "extra.jsonl", corpus[10:], prefix="e")
    out = str(tmp_path / "idx")
    assert clara_main(["index", "build", "--model", str(saved_model_dir), "--corpus", str(corpus_path),
                       "--output-dir", out]) == 0
    assert "10 documents" in capsys.readouterr().out
    assert clara_main(["index", "search", out, "Who won the match?", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("1. [d")
    assert clara_main(["index", "search", out, "Who won the match?", "--top-k", "4", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    # Without -k, as many hits as the model reads: its generation_top_k.
    assert clara_main(["index", "search", out, "Who won the match?"]) == 0
    generation_top_k = ClaraForRAG.from_pretrained(str(saved_model_dir)).config.generation_top_k
    assert len(capsys.readouterr().out.strip().splitlines()) == generation_top_k
    assert clara_main(["index", "add", out, "--corpus", str(extra_path)]) == 0
    assert "10 -> 12 documents" in capsys.readouterr().out
    assert clara_main(["index", "delete", out, "d0", "e1"]) == 0
    assert "10 documents left" in capsys.readouterr().out
    assert clara_main(["index", "vector-index", out, "--num-partitions", "2", "--kmeans-sample-rate", "4",
                       "--kmeans-iterations", "3"]) == 0
    assert "ivf_sq over 10 documents" in capsys.readouterr().out
    assert ClaraIndex.load(out).has_vector_index()
    assert clara_main(["ask", "--index", out, "Who won the match?", "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[d") + printed.count("[e") == 2 and "Answer:" in printed
    assert "[d0]" not in printed and "[e1]" not in printed
    with pytest.raises(SystemExit, match="not a CLaRa index"):
        clara_main(["index", "search", str(tmp_path / "nothing"), "Who?"])
