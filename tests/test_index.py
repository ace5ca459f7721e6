"""ClaraIndex: build / save / load / add / delete / search, fingerprints, FAISS, atomic save, resumable and
data-parallel builds, and the `clara index` / `clara ask` CLI, on tiny random CLaRa models."""

import hashlib
import json
import os
import signal
import subprocess
import sys
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
from modeling_clara.index import CURRENT_FILE, FAISS_KINDS, compressor_fingerprint, open_or_build_index

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


def test_exact_search_equals_model_retrieve_over_the_corpus(model, corpus):
    index = ClaraIndex.build(model, corpus, batch_size=5, shard_size=5)
    questions = ["Who founded the company?", "When was the film released?"]
    results = index.search(questions, k=4)
    scores, positions = model.retrieve(questions, [model.compress(corpus)] * 2, k=4)
    for result, expected_scores, expected_positions in zip(results, scores, positions):
        assert result.positions == expected_positions.tolist()
        assert result.ids == [str(p) for p in expected_positions.tolist()]
        assert result.texts == [corpus[p] for p in expected_positions.tolist()]
        torch.testing.assert_close(torch.tensor(result.scores), expected_scores)


def test_corpus_inputs_agree_and_ids_are_kept(model, corpus, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(corpus)))
    from_list = ClaraIndex.build(model, corpus)
    from_jsonl = ClaraIndex.build(model, str(path))
    from_dataset = ClaraIndex.build(model, datasets.Dataset.from_dict({"contents": corpus}))
    assert list(from_jsonl.documents["id"]) == [f"doc-{i}" for i in range(len(corpus))]
    torch.testing.assert_close(from_list.embeddings(list(range(len(corpus)))), from_jsonl.embeddings(list(range(len(corpus)))))
    assert from_dataset.search("a question", k=3).positions == from_list.search("a question", k=3).positions


def test_save_load_round_trip_is_memory_mapped_and_identical(model, corpus, tmp_path):
    index = ClaraIndex.build(model, corpus, shard_size=5)
    index.save(tmp_path / "idx")
    loaded = ClaraIndex.load(tmp_path / "idx", model=model)
    assert all(shard.path is not None for shard in loaded.shards)  # read from the files, not copied into RAM
    positions = list(range(len(corpus)))
    torch.testing.assert_close(loaded.embeddings(positions), index.embeddings(positions), rtol=0, atol=0)
    assert loaded.search("Where is it?", k=5) == index.search("Where is it?", k=5)
    assert loaded.model_name == str(model.name_or_path)


def test_answer_from_the_index_equals_answer_from_the_retrieved_embeddings(model, corpus):
    index = ClaraIndex.build(model, corpus)
    question = "Who wrote the novel?"
    out = model.answer(question, index=index, return_dict=True)
    hits = index.search(question, k=model.config.generation_top_k)
    assert out["doc_indices"] == hits.ids
    assert out["answer"] == model.answer(question, index.embeddings(hits.positions), k=len(hits.positions))


def test_add_and_delete_persist(model, corpus, tmp_path):
    index = ClaraIndex.build(model, corpus[:8])
    index.add(corpus[8:])
    assert list(index.documents["id"]) == [str(i) for i in range(12)]
    torch.testing.assert_close(index.embeddings([9, 10]), model.compress(corpus[9:11]))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(datasets.Dataset.from_dict({"id": ["3"], "text": ["another text"]}))

    everything = index.search("Which team won?", k=12)
    gone = everything.ids[:3]
    index.delete(gone)
    assert len(index) == 9
    index.save(tmp_path / "idx")
    loaded = ClaraIndex.load(tmp_path / "idx", model=model)
    remaining = loaded.search("Which team won?", k=12)
    assert len(remaining.ids) == 9 and not set(gone) & set(remaining.ids)
    assert remaining.ids == everything.ids[3:]
    with pytest.raises(KeyError, match=gone[0]):
        loaded.delete([gone[0]])


def test_an_index_refuses_a_model_that_compresses_differently(model, corpus, tiny_llama_dir, tmp_path):
    ClaraIndex.build(model, corpus).save(tmp_path / "idx")
    other = make_tiny_clara(tiny_llama_dir, seed=1)
    with pytest.raises(ValueError, match="compressor_sha256"):
        ClaraIndex.load(tmp_path / "idx", model=other)
    with pytest.raises(ValueError, match="compr_rate"):
        ClaraIndex.load(tmp_path / "idx", model=make_tiny_clara(tiny_llama_dir, compr_rate=4))
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


def _saved_version(index_dir) -> str:
    return (Path(index_dir) / CURRENT_FILE).read_text().strip()


def test_open_or_build_index_reuses_an_index_only_for_the_same_compressor_and_corpus(
    model, corpus, tiny_llama_dir, tmp_path, caplog
):
    index_dir = tmp_path / "idx"
    built = open_or_build_index(model, corpus[:6], index_dir)
    version = _saved_version(index_dir)
    reused = open_or_build_index(model, corpus[:6], index_dir)
    assert _saved_version(index_dir) == version  # loaded, not written again
    assert all(shard.path is not None for shard in reused.shards)
    torch.testing.assert_close(reused.embeddings(list(range(6))), built.embeddings(list(range(6))), rtol=0, atol=0)
    # Without a corpus the folder is opened as it is.
    assert list(open_or_build_index(model, index_dir=index_dir).documents["text"]) == corpus[:6]

    with caplog.at_level("WARNING", logger="modeling_clara.index"):
        other_corpus = open_or_build_index(model, corpus[:7], index_dir)
    assert "other documents" in caplog.text and _saved_version(index_dir) != version
    assert len(other_corpus) == 7

    other_model = make_tiny_clara(tiny_llama_dir, seed=1)
    version = _saved_version(index_dir)
    with pytest.raises(ValueError, match="compressor_sha256"):  # no corpus to rebuild from
        open_or_build_index(other_model, index_dir=index_dir)
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_clara.index"):
        rebuilt = open_or_build_index(other_model, corpus[:7], index_dir)
    assert "compressor_sha256" in caplog.text and _saved_version(index_dir) != version
    torch.testing.assert_close(rebuilt.embeddings(list(range(7))), other_model.compress(corpus[:7]), rtol=1e-4, atol=1e-5)


def test_open_or_build_index_names_what_is_missing(model, corpus, tmp_path):
    with pytest.raises(ValueError, match="needs a corpus, an index_dir, or both"):
        open_or_build_index(model)
    with pytest.raises(FileNotFoundError, match="not a CLaRa index"):
        open_or_build_index(model, index_dir=tmp_path / "nothing")
    in_memory = open_or_build_index(model, corpus[:3])
    assert len(in_memory) == 3 and all(shard.path is None for shard in in_memory.shards)


def test_the_shipped_corpus_is_a_corpus_name():
    shipped = read_corpus("shipped")
    assert len(shipped) > 0 and shipped[0]["text"].strip()
    assert list(shipped["id"]) == [json.loads(line)["id"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]


@pytest.mark.parametrize("kind", FAISS_KINDS)
@pytest.mark.parametrize("pooled", [False, True])
def test_faiss_candidates_are_rescored_exactly(model, kind, pooled, tmp_path):
    corpus = read_corpus("shipped")["text"][:80]  # enough rows to train FAISS's cells and codebooks
    index = ClaraIndex.build(model, corpus, batch_size=16)
    exact = index.search(["Who directed it?", "What year?"], k=5)
    index.build_faiss(kind, pooled=pooled, nlist=2, pq_m=4 if pooled else 16, nprobe=2)
    approximate = index.search(["Who directed it?", "What year?"], k=5, rerank_factor=16)
    for fast, slow in zip(approximate, exact):
        # Scores are CLaRa's exact cosine, whatever proposed the candidates.
        slow_by_position = dict(zip(slow.positions, slow.scores))
        for position, score in zip(fast.positions, fast.scores):
            if position in slow_by_position:
                assert score == pytest.approx(slow_by_position[position], abs=1e-6)
        if kind == "flat" and not pooled:
            assert fast.positions == slow.positions
    index.save(tmp_path / "idx")
    loaded = ClaraIndex.load(tmp_path / "idx", model=model)
    assert loaded.faiss_options["kind"] == kind
    # One question alone skips less padding than in a batch of two: the same ranking, scores equal to float rounding.
    alone = loaded.search("Who directed it?", k=5, rerank_factor=16)
    assert (alone.ids, alone.positions) == (approximate[0].ids, approximate[0].positions)
    assert alone.scores == pytest.approx(approximate[0].scores, abs=1e-6)


def test_bad_arguments_are_named(model, corpus, tiny_llama_dir):
    index = ClaraIndex.build(model, corpus)
    with pytest.raises(ValueError, match="k"):
        index.search("q", k=0)
    with pytest.raises(ValueError, match="questions"):
        index.search(["  "], k=2)
    with pytest.raises(ValueError, match="corpus"):
        ClaraIndex.build(model, ["fine", ""])
    with pytest.raises(TypeError, match="corpus"):
        ClaraIndex.build(model, 42)
    with pytest.raises(ValueError, match="unique"):
        ClaraIndex.build(model, datasets.Dataset.from_dict({"id": [1, 1], "text": ["a", "b"]}))
    with pytest.raises(ValueError, match="query reasoner"):
        ClaraIndex.build(make_tiny_clara(tiny_llama_dir, training_stage="stage1_2"), corpus).search("q", k=2)
    assert len(index.search("q", k=100).ids) == len(corpus)  # k above the corpus size returns every document


# ------------------------------------------------------------------------------------------------------------------
# Interrupted work: real subprocesses killed with SIGKILL at the worst moment

KILL_DURING_SAVE = """
import os, signal, sys
from modeling_clara import ClaraForRAG, ClaraIndex
import modeling_clara.index as index_module

model = ClaraForRAG.from_pretrained(sys.argv[1])
index = ClaraIndex.load(sys.argv[2], model=model)
index.add(["A new document that the killed save must not publish."])
write = index_module.write_text_atomic

def write_then_die(path, text):
    if path.name == index_module.CURRENT_FILE:  # everything of the new version is written; die before the switch
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, text)

index_module.write_text_atomic = write_then_die
index.save(sys.argv[2])
"""


@pytest.mark.slow
def test_a_save_killed_before_it_completes_leaves_the_previous_index(saved_model_dir, model, corpus, tmp_path):
    ClaraIndex.build(model, corpus).save(tmp_path / "idx")
    before = ClaraIndex.load(tmp_path / "idx", model=model).search("Who?", k=5)
    process = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(saved_model_dir), str(tmp_path / "idx")],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert len(list((tmp_path / "idx").glob("v-*"))) == 2  # the dead save's complete but unpublished version
    after = ClaraIndex.load(tmp_path / "idx", model=model)
    assert len(after) == len(corpus) and after.search("Who?", k=5) == before
    after.save(tmp_path / "idx")  # the next save cleans the orphan up
    assert len(list((tmp_path / "idx").glob("v-*"))) == 1


KILL_DURING_BUILD = """
import os, signal, sys
from modeling_clara import ClaraForRAG, ClaraIndex
import modeling_clara.index as index_module

model = ClaraForRAG.from_pretrained(sys.argv[1])
write, written = index_module._Shard.write, []

def write_then_die(self, path):
    write(self, path)
    written.append(path)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

index_module._Shard.write = write_then_die
ClaraIndex.build(model, sys.argv[2], shard_size=3, output_dir=sys.argv[3])
"""


@pytest.mark.slow
def test_a_killed_build_resumes_after_the_last_finished_shard(saved_model_dir, model, corpus, tmp_path, monkeypatch):
    corpus_path = tmp_path / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    out = tmp_path / "idx"
    process = subprocess.run([sys.executable, "-c", KILL_DURING_BUILD, str(saved_model_dir), str(corpus_path), str(out)],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert len(list((out / ".build").glob("shard-*.safetensors"))) == 2 and not (out / CURRENT_FILE).exists()

    compressed = []
    compress = model.compress
    monkeypatch.setattr(model, "compress", lambda texts, **kw: compressed.extend(texts) or compress(texts, **kw))
    resumed = ClaraIndex.build(model, str(corpus_path), shard_size=3, output_dir=out)
    assert compressed == corpus[6:]  # shards 0 and 1 (documents 0-5) were not compressed again
    assert not (out / ".build").exists()
    positions = list(range(len(corpus)))
    torch.testing.assert_close(resumed.embeddings(positions), compress(corpus), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_data_parallel_build_with_two_processes(saved_model_dir, model, corpus, tmp_path):
    corpus_path = tmp_path / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(corpus)))
    out = tmp_path / "idx"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "modeling_clara.cli", "index", "build", "--model", str(saved_model_dir),
               "--corpus", str(corpus_path), "--output-dir", str(out), "--shard-size", "3"]
    process = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO_DIR)
    assert process.returncode == 0, process.stderr[-3000:]
    # Shards 1 and 3 on process 0, shards 2 and 4 on process 1: each compressed once, by one process.
    for shard, rank in ((1, 0), (2, 1), (3, 0), (4, 1)):
        assert process.stderr.count(f"compressing shard {shard}/4") == 1
        assert f"process {rank}: compressing shard {shard}/4" in process.stderr
    index = ClaraIndex.load(out, model=model)
    assert list(index.documents["id"]) == [f"d{i}" for i in range(len(corpus))]
    torch.testing.assert_close(index.embeddings(list(range(len(corpus)))), model.compress(corpus), rtol=1e-4, atol=1e-5)


def test_cli_build_search_add_delete_ask(saved_model_dir, corpus, tmp_path, capsys):
    corpus_path = tmp_path / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(corpus[:10])))
    extra_path = tmp_path / "extra.jsonl"
    extra_path.write_text("".join(json.dumps({"id": f"e{i}", "text": t}) + "\n" for i, t in enumerate(corpus[10:])))
    out = str(tmp_path / "idx")
    assert clara_main(["index", "build", "--model", str(saved_model_dir), "--corpus", str(corpus_path),
                       "--output-dir", out, "--faiss", "flat"]) == 0
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
    assert clara_main(["ask", "--index", out, "Who won the match?", "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[d") + printed.count("[e") == 2 and "Answer:" in printed
    assert "[d0]" not in printed and "[e1]" not in printed
