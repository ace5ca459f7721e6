"""Training data: Apple's JSONL formats, checks that name file and line, labels on target tokens only, collators."""

import json
import pickle

import pytest
import torch
from transformers import AutoTokenizer

from conftest import DATA_DIR
from modeling_clara import ClaraConfig
from modeling_clara.data import ClaraDataError, load_clara_jsonl, make_collator
from modeling_clara.processing_clara import SYSTEM_PROMPT_PARAPHRASE, ClaraProcessor, add_clara_special_tokens

DOC = "Paris is the capital of France. The Seine flows through it."
QA_ROW = {"data_type": "qa", "question": ["What is the capital of France?", "What flows through Paris?"],
          "answers": ["Paris", "The Seine"], "docs": [DOC]}
PARAPHRASE_ROW = {"data_type": "paraphrase", "question": "", "answers": ["France's capital is Paris."], "docs": [DOC]}


@pytest.fixture(scope="module")
def processor(tiny_llama_dir) -> ClaraProcessor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)  # our own copy: tokens are added to it
    config = ClaraConfig(doc_max_length=32, compr_rate=8)
    add_clara_special_tokens(tokenizer, config.n_mem_tokens, config.different_mem_tokens)
    return ClaraProcessor(tokenizer, config)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def target_text(processor, batch, i) -> str:
    ids = batch["dec_input_ids"][i][batch["labels"][i] != -100]
    return processor.tokenizer.decode(ids)


def test_apple_pretrain_sample_loads(tmp_path):
    dataset = load_clara_jsonl(DATA_DIR / "clara_pretrain_sample.jsonl", "pretrain")
    assert len(dataset) == 1000
    assert dataset.column_names == ["task", "questions", "answers", "docs"]
    assert len(load_clara_jsonl(DATA_DIR / "clara_pretrain_sample.jsonl", "pretrain", max_samples=7)) == 7


def test_qa_target_is_all_pairs_and_prompt_is_masked(processor, tmp_path):
    rows = load_clara_jsonl(write_jsonl(tmp_path / "p.jsonl", [QA_ROW, {**QA_ROW, "question": ["Q?"], "answers": ["A"]}]), "pretrain")
    batch = make_collator("pretrain", processor, top_k=1)([rows[0], rows[1]])

    expected = "Question: What is the capital of France?\nAnswer: Paris\nQuestion: What flows through Paris?\nAnswer: The Seine"
    assert target_text(processor, batch, 0) == expected + "<|im_end|>\n"  # the template's closing tokens count too
    # Masked: left padding and exactly the generation prompt (its own token count, as Apple measures it).
    prompt, conversation = processor.build_prompt(1, "qa", QA_ROW["question"], QA_ROW["answers"])
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    short = batch["dec_attention_mask"][1].bool()
    assert (batch["labels"][1][~short] == -100).all()
    assert batch["dec_input_ids"][0][: len(prompt_ids)].tolist() == prompt_ids  # row 0 is the longest: no padding
    assert (batch["labels"][0][: len(prompt_ids)] == -100).all() and batch["labels"][0][len(prompt_ids)] != -100
    assert processor.tokenizer.decode(batch["dec_input_ids"][0][batch["dec_attention_mask"][0].bool()]) == conversation
    assert batch["enc_input_ids"].shape == (2, processor.encoder_length)
    assert batch["docs_per_example"].tolist() == [1, 1]


def test_paraphrase_target_is_the_first_answer(processor, tmp_path):
    rows = load_clara_jsonl(write_jsonl(tmp_path / "p.jsonl", [PARAPHRASE_ROW]), "pretrain")
    assert rows[0]["task"] == "paraphrase" and rows[0]["questions"] == []
    batch = make_collator("pretrain", processor, top_k=1, paraphrase_instruction=3)([rows[0]])
    assert target_text(processor, batch, 0) == "France's capital is Paris.<|im_end|>\n"
    text = processor.tokenizer.decode(batch["dec_input_ids"][0])
    assert SYSTEM_PROMPT_PARAPHRASE in text and "These two expressions are equivalent in essence" in text


def test_instruct_reads_the_first_top_k_documents_in_order(processor, tmp_path):
    docs = [f"Document number {i} about topic {i}." for i in range(4)]
    rows = [{"question": "Which?", "docs": docs, "answer": "three"},
            {"question": "Short?", "docs": docs[:1], "gold_answer": "one"}]
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "i.jsonl", rows), "instruct")
    batch = make_collator("instruct", processor, top_k=3)([dataset[0], dataset[1]])
    assert batch["docs_per_example"].tolist() == [3, 1]
    expected_enc, _ = processor.encode_documents(docs[:3] + docs[:1])
    assert torch.equal(batch["enc_input_ids"], expected_enc["input_ids"])
    assert target_text(processor, batch, 0) == "three<|im_end|>\n"
    assert target_text(processor, batch, 1) == "one<|im_end|>\n"
    prompt = processor.tokenizer.decode(batch["dec_input_ids"][0])
    assert prompt.count("<MEM0>") == 3 and "Question:Which?" in prompt


def test_e2e_batch_from_the_dev_format(processor):
    # Two rows of a dev file as a format example only (evaluation data is never trained on).
    dataset = load_clara_jsonl(DATA_DIR / "nq_dev.jsonl", "e2e", n_candidates=5, max_samples=2)
    originals = [json.loads(line) for line in (DATA_DIR / "nq_dev.jsonl").read_text(encoding="utf-8").splitlines()[:2]]
    batch = make_collator("e2e", processor, top_k=2)([dataset[0], dataset[1]])
    assert batch["enc_input_ids"].shape == (10, processor.encoder_length)
    assert batch["query_input_ids"].shape == (2, processor.encoder_length)
    assert batch["positive_mask"].shape == (2, 5) and batch["positive_mask"].sum(1).tolist() == [1, 1]
    for row, original in zip(dataset, originals):
        gold = original["docs"][original["pos_index"][0]]
        assert row["docs"][row["pos_index"][0]] == gold  # trimming keeps the gold candidate, remapped
        assert row["answer"] == original["gold_answer"]
    assert processor.tokenizer.decode(batch["dec_input_ids"][0]).count("<MEM0>") == 2
    assert target_text(processor, batch, 0) == originals[0]["gold_answer"] + "<|im_end|>\n"


def test_e2e_trimming_keeps_order_and_gold(tmp_path):
    row = {"question": "q?", "docs": [f"doc {i}" for i in range(6)], "answer": "a", "pos_index": [4]}
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "e.jsonl", [row]), "e2e", n_candidates=3)
    assert dataset[0]["docs"] == ["doc 0", "doc 1", "doc 4"] and dataset[0]["pos_index"] == [2]


def test_collators_pickle_and_run_in_dataloader_workers(processor, tmp_path):
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "p.jsonl", [QA_ROW, PARAPHRASE_ROW] * 4), "pretrain")
    collator = make_collator("pretrain", processor, top_k=1)
    assert pickle.loads(pickle.dumps(collator)).processor.mem_token_ids == processor.mem_token_ids
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4 and all(b["labels"].shape == b["dec_input_ids"].shape for b in batches)


def test_decoder_max_length_cuts_targets_and_rejects_prompts_that_do_not_fit(processor, tmp_path):
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "p.jsonl", [QA_ROW]), "pretrain")
    prompt_length = len(processor.tokenizer(processor.build_prompt(1, "qa")[0], add_special_tokens=False)["input_ids"])
    batch = make_collator("pretrain", processor, top_k=1, max_length=prompt_length + 3)([dataset[0]])
    assert batch["dec_input_ids"].shape[1] == prompt_length + 3 and (batch["labels"] != -100).sum() == 3
    with pytest.raises(ValueError, match="no target token"):
        make_collator("pretrain", processor, top_k=1, max_length=prompt_length)([dataset[0]])


@pytest.mark.parametrize(
    "stage, lines, message",
    [
        ("pretrain", ["{not json"], r"p\.jsonl:1: not valid JSON"),
        ("pretrain", [json.dumps(QA_ROW), "[1, 2]"], r"p\.jsonl:2: expected a JSON object"),
        ("pretrain", ["", json.dumps({**QA_ROW, "answers": ["only one"]})], r"p\.jsonl:2: 2 questions but 1 answers"),
        ("pretrain", [json.dumps({**QA_ROW, "data_type": "summary"})], r":1: data_type='summary'"),
        ("pretrain", [json.dumps({k: v for k, v in QA_ROW.items() if k != "docs"})], r":1: missing `docs`"),
        ("pretrain", [json.dumps({**QA_ROW, "docs": ["  "]})], r":1: `docs\[0\]` is empty"),
        ("pretrain", [json.dumps({**PARAPHRASE_ROW, "answers": "not a list"})], r":1: `answers` must be a non-empty list"),
        ("instruct", [json.dumps({"question": "q", "docs": ["d"]})], r":1: needs `answer` or `gold_answer`"),
        ("instruct", [json.dumps({"question": 3, "docs": ["d"], "answer": "a"})], r":1: `question` must be a str"),
        ("e2e", [json.dumps({"question": "q", "docs": ["d"], "answer": "a", "pos_index": [1]})], r":1: `pos_index` must list indices into `docs` \(0\.\.0\), got \[1\]"),
        ("e2e", [json.dumps({"question": "q", "docs": ["d", "e"], "answer": "a"}),
                 json.dumps({"question": "q", "docs": ["d"], "answer": "a"})], r":2: 1 candidate docs, but line 1 has 2.*n_candidates"),
        ("e2e", [], r"p\.jsonl: no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, stage, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(ClaraDataError, match=message):
        load_clara_jsonl(path, stage)


def test_too_few_candidates_for_n_candidates(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "q", "docs": ["d", "e"], "answer": "a"}])
    with pytest.raises(ClaraDataError, match=r"e\.jsonl:1: 2 candidate docs, fewer than n_candidates=3"):
        load_clara_jsonl(path, "e2e", n_candidates=3)
    with pytest.raises(ValueError, match="n_candidates"):
        load_clara_jsonl(path, "instruct", n_candidates=3)


def test_unequal_candidates_in_a_batch_is_an_error(processor):
    rows = [{"question": "q", "docs": ["d", "e"], "answer": "a", "pos_index": []},
            {"question": "q", "docs": ["d"], "answer": "a", "pos_index": []}]
    with pytest.raises(ValueError, match=r"same number of candidates.*\[1, 2\]"):
        make_collator("e2e", processor, top_k=1)(rows)
