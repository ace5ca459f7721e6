"""`clara eval`: data validation, document selection (Oracle), metrics and recall in summaries, resuming, CLI runs."""

import dataclasses
import hashlib
import json

import evaluate
import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

import modeling_clara.evaluation as evaluation
from conftest import DATA_DIR, make_tiny_clara
from modeling_clara.cli import main
from modeling_clara.evaluation import (
    EvalMethod,
    evaluate_file,
    evaluate_retrieval,
    expand_data_paths,
    generate_text,
    load_eval_data,
    select_documents,
    text_prompt,
    truncate_passage,
)
from modeling_clara.metrics import CLARA_QA_METRIC_PATH, recall_at_k
from modeling_clara.processing_clara import SYSTEM_PROMPT_ANSWER

# the option's name on the installed transformers (5 renamed it)
GROUP_BY_LENGTH = (["--train_sampling_strategy", "group_by_length"]
                   if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
                   else ["--group_by_length", "true"])

ROWS = [
    {"id": "q1", "question": "Which river flows through Paris?", "gold_answer": "the Seine", "answers": ["the Seine", "Seine River"],
     "pos_index": [2], "docs": ["Kilimanjaro is in Tanzania.", "The Loire is long.", "The Seine flows through Paris.",
                                "Photosynthesis needs light."]},
    {"id": "q2", "question": "Where is Kilimanjaro?", "gold_answer": "Tanzania", "answers": ["Tanzania"], "pos_index": [0, 3],
     "docs": ["Kilimanjaro is a volcano.", "Paris is in France.", "Rivers flow to the sea.", "It stands in Tanzania."]},
    {"id": "q3", "question": "Is the Loire longer than the Seine?", "gold_answer": "yes", "answers": ["yes"], "pos_index": [1],
     "docs": ["The Seine is 777 km long.", "The Loire is 1006 km long.", "Paris has many bridges."]},
    {"id": "q4", "question": "What do plants need for photosynthesis?", "gold_answer": "light", "answers": ["light", "sunlight"],
     "pos_index": [1], "docs": ["Plants are green.", "Photosynthesis needs light and water.", "Animals eat plants."]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "tiny_dev.jsonl", ROWS)


# ----------------------------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"question": ""}, "`question` must be a non-empty str"),
        ({"docs": []}, "`docs` must be a non-empty list"),
        ({"docs": ["ok", "  "]}, r"`docs\[1\]` is empty or whitespace-only"),
        ({"pos_index": [9]}, r"`pos_index` must list indices into `docs` \(0..3\)"),
        ({"pos_index": "2"}, "`pos_index` must list indices"),
        ({"answers": [], "gold_answer": None}, "`answers` must be a non-empty list"),
        ({"gold_answer": 3}, "`gold_answer` must be a non-empty str"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, broken, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], {**ROWS[0], **broken}])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: {message}"):
        load_eval_data(path)


def test_invalid_json_and_repeated_ids_are_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:3: not valid JSON"):
        load_eval_data(path)
    write_jsonl(path, [ROWS[0], ROWS[1], ROWS[0]])
    with pytest.raises(ValueError, match="bad.jsonl:3: id 'q1' repeats line 1"):
        load_eval_data(path)


def test_gold_answer_comes_first_and_limit_stops_reading(tmp_path, data_file):
    examples = load_eval_data(data_file, limit=2)
    assert [ex.id for ex in examples] == ["q1", "q2"]
    assert examples[0].answers == ["the Seine", "Seine River"]  # Apple's protocol scores against the first
    assert load_eval_data(write_jsonl(tmp_path / "alias_first.jsonl", [{**ROWS[0], "answers": ["Seine River", "the Seine"]}]))[
        0
    ].answers == ["the Seine", "Seine River"]
    # rows past the limit are not read (a bad row there is no error)
    path = tmp_path / "partly_bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    assert len(load_eval_data(path, limit=1)) == 1


def test_folders_give_only_evaluation_files(tmp_path, data_file):
    write_jsonl(tmp_path / "pretrain.jsonl", [{"data_type": "qa", "question": ["q?"], "answers": ["a"], "docs": ["d"]}])
    assert expand_data_paths([str(tmp_path)]) == [data_file]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        expand_data_paths([str(tmp_path / "missing.jsonl")])


# ----------------------------------------------------------------------------------------------------------------
# Selection: Normal and Oracle


def test_normal_reads_the_top_k_of_the_ranking():
    assert select_documents([4, 0, 3, 1, 2], pos_index=[2], setting="normal", k=3) == [4, 0, 3]


@pytest.mark.parametrize(
    "ranking, pos_index, k, expected",
    [
        ([4, 0, 3, 1, 2], [2], 3, [4, 0, 2]),  # the worst-ranked gold replaces the last place, keeps rank order
        ([4, 0, 3, 1, 2], [0], 3, [4, 0, 3]),  # already among the k: the same as Normal
        ([4, 0, 3, 1, 2], [2, 1, 3], 2, [3, 1]),  # more gold than k: the best-ranked gold
        ([0, 1, 2], [1, 2], 5, [0, 1, 2]),  # fewer candidates than k
    ],
)
def test_oracle_reads_every_gold_passage_in_ranking_order(ranking, pos_index, k, expected):
    selected = select_documents(ranking, pos_index, "oracle", k)
    assert selected == expected
    assert len(selected) == min(k, len(ranking))
    assert set(pos_index) <= set(selected) or len(pos_index) > k


def test_oracle_clara_run_reads_all_gold_documents(tiny_clara, data_file, tmp_path):
    summary = evaluate_file(tiny_clara, data_file, "clara", "oracle", k=2, max_new_tokens=3, output_dir=tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out/tiny_dev/clara-oracle-k2.jsonl").read_text().splitlines()]
    assert summary["ranking"] == "clara" and summary["gold_read"] == 100.0
    for record in records:
        assert set(record["pos_index"]) <= set(record["selected"]) and len(record["selected"]) == 2
        # the query reasoner's ranking, with its cosine scores in descending order
        assert sorted(record["ranking"]) == list(range(len(record["ranking"])))
        assert record["scores"] == sorted(record["scores"], reverse=True)


def test_clara_without_query_reasoner_reads_the_given_order(tiny_llama_dir, data_file, tmp_path):
    from conftest import make_tiny_clara

    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    assert not model.has_query_reasoner
    summary = evaluate_file(model, data_file, "clara", "normal", k=2, max_new_tokens=3, output_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "tiny_dev/clara-normal-k2.jsonl").read_text().splitlines()]
    assert summary["ranking"] == "given_order"
    assert [r["selected"] for r in records] == [[0, 1]] * len(ROWS)


def test_wrong_memory_control_reads_only_non_gold_candidates(tiny_clara, data_file, tmp_path):
    summary = evaluate_file(tiny_clara, data_file, "clara_wrong_memory", "oracle", k=2, max_new_tokens=3,
                            output_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "tiny_dev/clara_wrong_memory-normal-k2.jsonl").read_text().splitlines()]
    assert summary["gold_read"] == 0.0 and summary["setting"] == "normal"  # the oracle setting does not apply
    expected = [[i for i in range(len(row["docs"])) if i not in row["pos_index"]][:2] for row in ROWS]
    assert [r["selected"] for r in records] == expected


def test_wrong_memory_control_needs_a_non_gold_candidate(tiny_clara, tmp_path):
    all_gold = write_jsonl(tmp_path / "gold_dev.jsonl", [{**ROWS[0], "pos_index": [0, 1, 2, 3]}])
    with pytest.raises(ValueError, match="every candidate is gold"):
        evaluate_file(tiny_clara, all_gold, "clara_wrong_memory", "normal", k=2, max_new_tokens=3, output_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and the plain backbone


def test_closed_book_and_text_prompts(tiny_clara):
    closed = text_prompt(tiny_clara, "Who wrote Hamlet?", [])
    assert SYSTEM_PROMPT_ANSWER in closed and "Question:Who wrote Hamlet?" in closed and "Background" not in closed
    rag = text_prompt(tiny_clara, "Who wrote Hamlet?", ["Hamlet: a play.", "Shakespeare: a writer."])
    assert "Background:\nHamlet: a play.\nShakespeare: a writer.\n\nQuestion:Who wrote Hamlet?" in rag
    assert "<MEM0>" not in rag


def test_text_passages_are_cut_where_the_compressor_stops(tiny_clara):
    limit = tiny_clara.config.doc_max_length
    long_passage = " ".join(f"word{i}" for i in range(200))
    cut = truncate_passage(tiny_clara.tokenizer, long_passage, limit)
    assert len(tiny_clara.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= limit + 1
    assert long_passage.startswith(cut.strip()) and truncate_passage(tiny_clara.tokenizer, "short one", limit) == "short one"


def test_plain_backbone_generation_leaves_the_adapters_on(tiny_clara):
    embeds = tiny_clara.compress(["Paris is the capital of France.", "The Seine flows through Paris."])
    before = tiny_clara.answer("Which river?", embeds, max_new_tokens=4)
    plain = generate_text(tiny_clara, [text_prompt(tiny_clara, "Which river?", [])], max_new_tokens=4)
    assert isinstance(plain[0], str)
    assert tiny_clara.answer("Which river?", embeds, max_new_tokens=4) == before
    assert not any(getattr(m, "disable_adapters", False) for m in tiny_clara.decoder.modules() if hasattr(m, "lora_A"))


# ----------------------------------------------------------------------------------------------------------------
# Metrics and recall in summaries; resuming


PREDICTIONS = {  # question -> canned answer of the "model"
    ROWS[0]["question"]: "Seine River",  # EM only against the alias (max protocol); Cover-EM against "the Seine"
    ROWS[1]["question"]: "in Tanzania, Africa",  # Cover-EM, partial F1
    ROWS[2]["question"]: "True",  # Apple maps True -> yes
    ROWS[3]["question"]: "sunlight and water",  # F1 against the alias only
}


@pytest.fixture
def canned_generation(monkeypatch):
    """Replace backbone generation with `PREDICTIONS`, counting the questions generated for."""
    calls = []

    def fake_generate_text(model, prompts, max_new_tokens, **kwargs):
        answers = [next(a for q, a in PREDICTIONS.items() if f"Question:{q}" in p) for p in prompts]
        calls.extend(answers)
        return answers

    monkeypatch.setattr(evaluation, "generate_text", fake_generate_text)
    return calls


@pytest.fixture
def counted_generation(monkeypatch):
    """The real backbone generation, recording the prompts it answers."""
    calls, generate = [], evaluation.generate_text

    def counting_generate_text(model, prompts, max_new_tokens, **kwargs):
        calls.extend(prompts)
        return generate(model, prompts, max_new_tokens, **kwargs)

    monkeypatch.setattr(evaluation, "generate_text", counting_generate_text)
    return calls


def test_summary_equals_the_evaluate_metric_and_recall_at_k(tiny_clara, data_file, tmp_path, canned_generation):
    summary = evaluate_file(tiny_clara, data_file, "text_rag_bm25", "normal", k=2, output_dir=tmp_path)

    expected = evaluate.load(CLARA_QA_METRIC_PATH).compute(
        predictions=[PREDICTIONS[r["question"]] for r in ROWS],
        references=[[r["gold_answer"]] + [a for a in r["answers"] if a != r["gold_answer"]] for r in ROWS],
    )
    for key, value in expected.items():
        assert summary[key] == pytest.approx(100 * value, abs=0.01), key
    assert summary["apple_em"] < summary["em"] and 0 < summary["apple_f1"] < 100  # the protocols differ here

    records = [json.loads(line) for line in (tmp_path / "tiny_dev/text_rag_bm25-normal-k2.jsonl").read_text().splitlines()]
    for k in (1, 3, 5):
        mean = sum(recall_at_k(r["ranking"], r["pos_index"], k) for r in records) / len(records)
        assert summary[f"recall@{k}"] == pytest.approx(100 * mean, abs=0.01)
    assert records[0]["ranking"][0] == 2  # BM25 puts "The Seine flows through Paris." first
    assert summary["n"] == len(ROWS) and summary["prompt_tokens"] > 0


def test_rerun_skips_examples_already_predicted(tiny_clara, data_file, tmp_path, counted_generation):
    canned_generation = counted_generation
    run = dict(model=tiny_clara, data=data_file, method="closed_book", setting="normal", k=2, output_dir=tmp_path)
    predictions = tmp_path / "tiny_dev/closed_book.jsonl"
    evaluate_file(**run, limit=2)
    first_lines = predictions.read_text().splitlines()
    assert len(canned_generation) == 2 and len(first_lines) == 2

    summary = evaluate_file(**run)  # the whole file now: only q3 and q4 are new
    assert len(canned_generation) == 4 and summary["n"] == 4
    assert predictions.read_text().splitlines()[:2] == first_lines

    evaluate_file(**run)  # nothing left to do
    assert len(canned_generation) == 4 and len(predictions.read_text().splitlines()) == 4

    # A kill in the middle of a write leaves half a line: it is dropped and that example runs again.
    predictions.write_text(predictions.read_text()[:-20])
    summary = evaluate_file(**run)
    assert len(canned_generation) == 5 and summary["n"] == 4
    assert [json.loads(line)["id"] for line in predictions.read_text().splitlines()] == ["q1", "q2", "q3", "q4"]


def test_resuming_with_other_settings_is_an_error(tiny_clara, data_file, tmp_path, canned_generation):
    evaluate_file(tiny_clara, data_file, "closed_book", max_new_tokens=8, output_dir=tmp_path, limit=1)
    with pytest.raises(ValueError, match=r"holds predictions of another run \(differs in \['max_new_tokens'\]"):
        evaluate_file(tiny_clara, data_file, "closed_book", max_new_tokens=16, output_dir=tmp_path, limit=1)


def test_resuming_with_another_model_of_the_same_name_is_an_error(tiny_llama_dir, data_file, tmp_path):
    """Results resume by model name; a model retrained under that name (its LoRA weights differ) is another run."""
    retrained = make_tiny_clara(tiny_llama_dir, seed=1)
    answers = dict(data=data_file, method="clara", k=2, max_new_tokens=2, output_dir=tmp_path, model_name="shipped")
    retrieval = dict(data=data_file, ranker="clara", output_dir=tmp_path, model_name="shipped")
    for model in (make_tiny_clara(tiny_llama_dir, seed=0), make_tiny_clara(tiny_llama_dir, seed=0)):  # resumed
        evaluate_file(model, **answers)
        evaluate_retrieval(model=model, **retrieval)
    with pytest.raises(ValueError, match=r"differs in \['adapter_digest'\]"):
        evaluate_file(retrained, **answers)
    with pytest.raises(ValueError, match=r"differs in \['adapter_digest'\]"):
        evaluate_retrieval(model=retrained, **retrieval)


def recorded_compressions(monkeypatch, model) -> list[str]:
    """The passages `model.compress` is called on from here on (it still compresses them)."""
    compressed, compress = [], model.compress
    monkeypatch.setattr(model, "compress", lambda docs, **kw: compressed.extend(docs) or compress(docs, **kw))
    return compressed


def test_shared_compression_cache_compresses_each_passage_once(tiny_clara, data_file, tmp_path, monkeypatch):
    compressed = recorded_compressions(monkeypatch, tiny_clara)
    method = EvalMethod("clara", tiny_clara)
    for setting in ("normal", "oracle"):
        evaluate_file(tiny_clara, data_file, method, setting, k=2, max_new_tokens=2, output_dir=tmp_path)
    assert sorted(compressed) == sorted({d for r in ROWS for d in r["docs"]})


def test_a_later_method_reads_the_ranking_clara_recorded(tiny_clara, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    """Ranking compresses every candidate: a method run later on the same model and file reads the ranking CLaRa's
    run recorded (so both read the same passages); a model with other weights ranks afresh."""
    run = dict(data=data_file, k=1, max_new_tokens=2, output_dir=tmp_path)
    evaluate_file(tiny_clara, method="clara", **run)
    clara_path = tmp_path / "tiny_dev/clara-normal-k1.jsonl"
    # A ranking the query reasoner did not give (its own, reversed) shows which one the later run reads; the half
    # line after it is a write still under way in that run's process, which must be neither read nor cut off.
    recorded = [json.loads(line) for line in clara_path.read_text().splitlines()]
    for record in recorded:
        record["ranking"], record["scores"] = record["ranking"][::-1], record["scores"][::-1]
    clara_path.write_text("".join(json.dumps(r) + "\n" for r in recorded) + '{"id": "q9", "ran')
    written = clara_path.read_bytes()
    compressed = recorded_compressions(monkeypatch, tiny_clara)

    evaluate_file(tiny_clara, method="text_rag_clara", **run)
    text = [json.loads(line) for line in (tmp_path / "tiny_dev/text_rag_clara-normal-k1.jsonl").read_text().splitlines()]
    assert [r["ranking"] for r in text] == [r["ranking"] for r in recorded]
    assert [r["selected"] for r in text] == [r["ranking"][:1] for r in recorded]
    assert compressed == [] and clara_path.read_bytes() == written

    retrained = make_tiny_clara(tiny_llama_dir, seed=1)
    compressed_by_retrained = recorded_compressions(monkeypatch, retrained)
    evaluate_file(retrained, method="text_rag_clara", **{**run, "k": 2})
    assert sorted(set(compressed_by_retrained)) == sorted({d for r in ROWS for d in r["docs"]})


# ----------------------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture
def saved_tiny_clara(tiny_clara, tmp_path):
    tiny_clara.save_pretrained(tmp_path / "tiny_clara")
    return str(tmp_path / "tiny_clara")


def test_cli_eval_end_to_end(saved_tiny_clara, data_file, tmp_path, capsys):
    data = [str(data_file)]
    if (DATA_DIR / "hotpotqa_dev.jsonl").exists():
        data.append(str(DATA_DIR / "hotpotqa_dev.jsonl"))
    out = tmp_path / "results"
    argv = ["eval", "--model", saved_tiny_clara, "--data", *data, "--limit", "3", "--top-k", "2", "--max-new-tokens",
            "3", "--batch-size", "2", "--output-dir", str(out), "--setting", "normal", "oracle", "--method", "clara",
            "closed_book", "text_rag_bm25", "text_rag_minilm", "text_oracle"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    # 3 methods x 2 settings + closed_book + text_oracle, per file
    assert table.count("| tiny_dev |") == 8 and "| closed_book | none |" in table
    runs = sorted(p.name for p in (out / "tiny_dev").glob("*.jsonl"))
    assert runs == ["clara-normal-k2.jsonl", "clara-oracle-k2.jsonl", "closed_book.jsonl", "text_oracle-oracle-k2.jsonl",
                    "text_rag_bm25-normal-k2.jsonl", "text_rag_bm25-oracle-k2.jsonl", "text_rag_minilm-normal-k2.jsonl",
                    "text_rag_minilm-oracle-k2.jsonl"]
    for path in (out / "tiny_dev").glob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in records] == ["q1", "q2", "q3"]
        assert all({"prediction", "selected", "apple_f1", "f1", "cover_em"} <= r.keys() for r in records)
    assert "| EM | F1 | CEM | EM (max) | F1 (max) | CEM (max) | R@1 | R@3 | R@5 |" in (out / "summary.md").read_text()

    assert main(argv) == 0  # a rerun only re-reads the predictions
    assert capsys.readouterr().out == table


def test_cli_eval_reads_generation_top_k_unless_told(saved_tiny_clara, tiny_clara, data_file, tmp_path):
    common = ["eval", "--model", saved_tiny_clara, "--data", str(data_file), "--limit", "1", "--max-new-tokens", "2",
              "--method", "clara"]
    assert main([*common, "--output-dir", str(tmp_path / "default")]) == 0
    assert main([*common, "-k", "1", "--output-dir", str(tmp_path / "told")]) == 0
    k = tiny_clara.config.generation_top_k
    assert k != 5  # the fixed default of other tools: this checks the model's own is read
    assert [p.name for p in (tmp_path / "default" / "tiny_dev").glob("*.jsonl")] == [f"clara-normal-k{k}.jsonl"]
    assert [p.name for p in (tmp_path / "told" / "tiny_dev").glob("*.jsonl")] == ["clara-normal-k1.jsonl"]


def test_cli_eval_builds_a_fresh_clara_on_a_backbone(tiny_llama_dir, data_file, tmp_path):
    argv = ["eval", "--model", str(tiny_llama_dir), "--compr-rate", "8", "--doc-max-length", "32", "--data",
            str(data_file), "--limit", "1", "--max-new-tokens", "2", "--method", "clara", "--device", "cpu"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    config = json.loads(next((tmp_path / "tiny_dev").glob("clara-normal-k*.config.json")).read_text())
    assert config["compr_rate"] == 8 and config["backbone"] == str(tiny_llama_dir)
    assert config["adapters"] == ["decoder_adapter", "encoder_adapter"]  # a fresh instruct (stage1_2) CLaRa


def test_adapter_digest_hashes_the_lora_weights_as_before(tiny_clara):
    """The digest is recorded with results; float32 models keep the digest of their earlier runs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tiny_clara.state_dict().items()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    assert evaluation.adapter_digest(tiny_clara) == digest.hexdigest()[:16]


def test_cli_eval_retrieval(saved_tiny_clara, data_file, tmp_path, capsys):
    argv = ["eval-retrieval", "--model", saved_tiny_clara, "--data", str(data_file), "--output-dir", str(tmp_path),
            "--ranker", "clara", "bm25", "given_order"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| R@1 | R@3 | R@5 |" in table
    summaries = {s["ranking"]: s for s in (json.loads(p.read_text()) for p in tmp_path.glob("tiny_dev/*.summary.json"))}
    assert summaries.keys() == {"clara", "bm25", "given_order"}
    assert all(s["n"] == len(ROWS) and s["recall@5"] == 100.0 for s in summaries.values())  # <= 4 candidates
    with pytest.raises(SystemExit, match="--ranker clara needs --model"):
        main(["eval-retrieval", "--data", str(data_file), "--ranker", "clara"])


# ----------------------------------------------------------------------------------------------------------------
# Benchmark and plots (the scripts under benchmarks/)


def load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficiency_benchmark_and_plots(tiny_llama_dir, data_file, tmp_path, capsys):
    efficiency = tmp_path / "efficiency.json"
    summaries = load_script("bench_efficiency").main(
        ["--backbone", str(tiny_llama_dir), "--data", str(data_file), "--n-questions", "2", "--k", "2",
         "--compr-rates", "4", "16", "--doc-max-length", "32", "--max-new-tokens", "3", "--output", str(efficiency)]
    )
    assert list(summaries) == ["text", "clara-4", "clara-16"]
    # k * (n_mem + <SEP>) memory slots: 2 * (8 + 1) at CR 4, 2 * (2 + 1) at CR 16; text reads the passages
    assert summaries["clara-4"]["context_tokens_median"] - summaries["clara-16"]["context_tokens_median"] == 12
    assert summaries["clara-16"]["compress_s_median"] > 0 and summaries["text"]["compress_s_median"] == 0
    assert "| CLaRa | 16 |" in capsys.readouterr().out

    results = tmp_path / "results"
    for rate, f1 in ((4, 20.0), (16, 10.0)):
        for dataset in ("a_dev", "b_dev"):
            for setting in ("normal", "oracle"):
                run = results / f"cr{rate}" / dataset / f"clara-{setting}-k5.summary.json"
                run.parent.mkdir(parents=True, exist_ok=True)
                run.write_text(json.dumps({"dataset": dataset, "method": "clara", "setting": setting, "k": 5, "n": 3,
                                           "compr_rate": rate, "ranking": "clara", "model": f"m{rate}", "apple_f1": f1,
                                           "apple_em": 0.0, "apple_cover_em": f1, "f1": f1, "em": 0.0, "cover_em": f1,
                                           "recall@1": 10.0, "recall@3": 20.0, "recall@5": 30.0}))
    figures, tables = tmp_path / "figures", tmp_path / "tables.md"
    load_script("plot_results").main(["--results", str(results), "--efficiency", str(efficiency), "--out", str(figures),
                                      "--tables", str(tables)])
    for png in ("f1_vs_compression.png", "latency_vs_compression.png"):
        assert (figures / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tables.read_text()
    assert "| CLaRa | normal | 4 | clara | 5 | 3/3 | 20.0 / 0.0 / 20.0 | 20.0 / 0.0 / 20.0 | 20.0 / 0.0 / 20.0 |" in text
    assert "| CLaRa query reasoner | 16 | 10.0 / 20.0 / 30.0 | 10.0 / 20.0 / 30.0 |" in text


@pytest.mark.parametrize("target", ["answer", "passage"])
def test_memory_probe_sees_only_the_passage(tiny_llama_dir, data_file, target):
    """The probe's gap comes from the passage read and nothing else: zero when both passages are the same text,
    non-zero for a random model reading different passages."""
    from conftest import make_tiny_clara
    from modeling_clara.probing import ProbeCase, probe_memory_use

    script = load_script("probe_memory_use")
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2").eval()
    cases = script.probe_cases(str(data_file), n_questions=3, target=target)
    assert [c.gold for c in cases] == [ROWS[i]["docs"][ROWS[i]["pos_index"][0]] for i in range(3)]
    expected = [ROWS[i]["answers"][0] if target == "answer" else c.gold for i, c in enumerate(cases)]
    assert [c.target for c in cases] == expected
    same = probe_memory_use(model, [ProbeCase(c.question, c.target, c.gold, c.gold) for c in cases], target)
    assert same["gap"] == 0 and same["gold_lower"] == 0
    assert same["memory_cosine"] == pytest.approx(1.0)
    different = probe_memory_use(model, cases, target)
    assert different["gap"] != 0
    assert different["memory_cosine"] < 0.999
    assert different["gap"] == pytest.approx(different["ce_other"] - different["ce_gold"])


# ----------------------------------------------------------------------------------------------------------------
# The fine-tuned text reader and CLaRa-minus-text intervals


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    from modeling_clara.evaluation import paired_bootstrap

    constant = paired_bootstrap([3.0] * 20, [1.0] * 20)
    assert constant == {"difference": 2.0, "low": 2.0, "high": 2.0, "n": 20}
    # 100 paired questions, a - b is 1 on half of them and 0 on the rest: mean 0.5, standard error 0.05, so a 95%
    # interval about 0.5 +- 1.96 * 0.05.
    half = paired_bootstrap([1.0] * 50 + [0.0] * 50, [0.0] * 100, n_resamples=2000)
    assert half["difference"] == 0.5 and half["n"] == 100
    assert half["low"] < 0.5 < half["high"]
    assert abs((half["high"] - half["low"]) - 2 * 1.96 * 0.05) < 0.03
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_text_rag_clara_reads_the_passages_clara_reads(tiny_clara, data_file):
    examples = load_eval_data(data_file)
    clara = EvalMethod("clara", tiny_clara).run(examples, "normal", 2, max_new_tokens=2)
    text = EvalMethod("text_rag_clara", tiny_clara).run(examples, "normal", 2, max_new_tokens=2)
    assert [r["selected"] for r in text] == [r["selected"] for r in clara]
    assert all(r["prompt_tokens"] > c["prompt_tokens"] for r, c in zip(text, clara))  # passages as text are longer
    with pytest.raises(ValueError, match="--text-reader"):
        EvalMethod("text_reader", tiny_clara)


def test_text_reader_labels_only_the_answer(tiny_clara):
    from modeling_clara.text_reader import TextReaderCollator

    row = {"question": "Which river flows through Paris?", "docs": ["The Seine flows through Paris.", "The Loire."],
           "answer": "the Seine"}
    batch = TextReaderCollator(tiny_clara.processor, top_k=1)([row])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tiny_clara.tokenizer.decode(labelled).startswith("the Seine")
    prompt = tiny_clara.tokenizer.decode(batch["input_ids"][0])
    assert "The Seine flows through Paris." in prompt and "The Loire." not in prompt  # top_k 1


def test_text_reader_loss_reads_only_answer_logits_and_equals_the_full_loss(tiny_clara, tiny_llama_dir):
    from transformers import LlamaForCausalLM

    from modeling_clara.text_reader import TextReaderCollator

    rows = [{"question": "Which river flows through Paris?", "docs": ["The Seine flows through Paris, " * 3],
             "answer": "the Seine"},
            {"question": "Who?", "docs": ["A short one."], "answer": "nobody at all, as far as anyone knows"}]
    batch = TextReaderCollator(tiny_clara.processor, top_k=1)(rows)
    reader = LlamaForCausalLM.from_pretrained(tiny_llama_dir).train()

    torch.manual_seed(0)  # the same dropout (none in the tiny Llama, but the check should not depend on it)
    kept = reader(**batch)
    kept.loss.backward()
    kept_grad = reader.model.embed_tokens.weight.grad.clone()
    reader.zero_grad()
    torch.manual_seed(0)
    full = reader(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    full.loss.backward()

    answer_positions = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert kept.logits.shape[1] == answer_positions < batch["input_ids"].shape[1]
    torch.testing.assert_close(kept.loss, full.loss)
    torch.testing.assert_close(kept_grad, reader.model.embed_tokens.weight.grad)


def test_text_reader_groups_rows_by_length(saved_tiny_clara, tmp_path):
    from modeling_clara.loading import load_model
    from modeling_clara.text_reader import TextReaderCollator, example_length, groups_by_length

    def parsed(options):
        return HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *options])[0]

    assert groups_by_length(parsed(GROUP_BY_LENGTH)) and not groups_by_length(parsed([]))
    clara = load_model(saved_tiny_clara)
    collator = TextReaderCollator(clara.processor, top_k=2)
    short = {"question": "Q?", "docs": ["a"], "answer": "b"}
    long = {"question": "Q?", "docs": ["many words here " * 20, "and more " * 20], "answer": "b"}
    assert example_length(collator, short) < example_length(collator, long)
    assert example_length(collator, long) == collator(rows=[long])["input_ids"].shape[1]


def test_text_reader_benchmark_measures_answer_logits_and_length_groups(saved_tiny_clara, tmp_path, capsys):
    rows = [{"question": f"Question {i}?", "docs": ["word " * (3 + 7 * i), "other " * (2 + 5 * (i % 4))],
             "answer": "yes" if i % 2 else "a longer answer"} for i in range(12)]
    results = load_script("bench_text_reader").main(
        ["--model", saved_tiny_clara, "--data", str(write_jsonl(tmp_path / "rows.jsonl", rows)), "--batch-size", "2",
         "--batches", "3"])
    full, answer, grouped = (results[name] for name in ("full logits, random order", "answer logits, random order",
                                                         "answer logits, length groups"))
    assert answer["lm_head_positions"] < full["lm_head_positions"]  # the same batches, fewer logits
    assert answer["padding"] == full["padding"] and grouped["padding"] < full["padding"]
    assert "| answer logits, length groups |" in capsys.readouterr().out


def test_text_reader_trains_resumes_and_is_evaluated_beside_clara(saved_tiny_clara, data_file, tmp_path, capsys):
    from modeling_clara.text_reader import main as train_main

    rows = [{"question": r["question"], "docs": [r["docs"][r["pos_index"][0]], r["docs"][-1]], "answer": r["gold_answer"]}
            for r in ROWS]
    train_file = write_jsonl(tmp_path / "stage2.jsonl", rows)
    reader_dir = tmp_path / "reader"
    common = ["--model", saved_tiny_clara, "--data", str(train_file), "--output_dir", str(reader_dir),
              "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--save_steps", "1",
              "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", *GROUP_BY_LENGTH]
    assert train_main(common + ["--max_steps", "2"]) == 0
    assert (reader_dir / "checkpoint-2").is_dir() and (reader_dir / "adapter_model.safetensors").is_file()
    assert train_main(common + ["--max_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    state = json.loads((reader_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len([e for e in state["log_history"] if "loss" in e]) <= 3

    out = tmp_path / "results"
    argv = ["eval", "--model", saved_tiny_clara, "--data", str(data_file), "--top-k", "1", "2", "--max-new-tokens", "3",
            "--output-dir", str(out), "--method", "clara", "text_rag_clara", "text_reader", "closed_book",
            "--text-reader", str(reader_dir)]
    assert main(argv) == 0
    runs = sorted(p.name for p in (out / "tiny_dev").glob("*.jsonl"))
    assert runs == ["clara-normal-k1.jsonl", "clara-normal-k2.jsonl", "closed_book.jsonl",
                    "text_rag_clara-normal-k1.jsonl", "text_rag_clara-normal-k2.jsonl", "text_reader-normal-k1.jsonl",
                    "text_reader-normal-k2.jsonl"]
    config = json.loads((out / "tiny_dev" / "text_reader-normal-k2.config.json").read_text())
    assert config["text_reader"] == str(reader_dir) and len(config["text_reader_digest"]) == 16
    differences = (out / "differences.md").read_text()
    assert "| tiny_dev | clara-normal-k2 | text_reader-normal-k2 | 4 |" in differences
    assert "| tiny_dev | clara-normal-k2 | text_rag_clara-normal-k2 | 4 |" in differences


def test_difference_rows_pair_questions_by_id(tmp_path):
    from modeling_clara.evaluation import difference_rows

    def write_run(name, f1s):
        records = [{"id": f"q{i}", "apple_em": 0.0, "apple_f1": f1, "apple_cover_em": 1.0} for i, f1 in f1s]
        write_jsonl(tmp_path / "set" / f"{name}-normal-k2.jsonl", records)

    (tmp_path / "set").mkdir()
    write_run("clara", [(0, 1.0), (1, 0.5), (2, 0.0)])
    write_run("text_reader", [(2, 0.5), (1, 0.5), (3, 1.0)])  # q1, q2 in both
    [row] = difference_rows(tmp_path)
    assert row["minus"] == "text_reader-normal-k2" and row["apple_f1"]["n"] == 2
    assert row["apple_f1"]["difference"] == pytest.approx((0.0 - 50.0) / 2)
    assert row["apple_cover_em"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "n": 2}
