"""Apple conformance: tiny checkpoints in Apple's released format, with outputs recorded from Apple's own code.

The fixtures live in tests/fixtures/conformance (their provenance: tests/fixtures/README.md).
Checkpoints load with `adapter_loading="training_stage"`, the path of Apple's README that the recording used,
except where a test says otherwise.
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from conftest import CONFORMANCE_DIR
from modeling_clara import ClaraForRAG
from modeling_clara.modeling_clara import cosine_scores, differentiable_topk

CHECKPOINTS = ("base", "instruct", "e2e")
EXPECTED = json.loads((CONFORMANCE_DIR / "expected.json").read_text())
INPUTS = json.loads((CONFORMANCE_DIR / "inputs.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    return load_file(CONFORMANCE_DIR / "expected.safetensors")


@pytest.fixture(scope="module")
def models():
    return {name: ClaraForRAG.from_pretrained(str(CONFORMANCE_DIR / name), adapter_loading="training_stage")
            for name in CHECKPOINTS}


def expected(name: str, call: str) -> dict:
    return EXPECTED["checkpoints"][name][call]


def slot_map(model: ClaraForRAG, dec_input_ids: torch.Tensor, docs_per_example: list[int]) -> list[list[int]]:
    """Which compressed vector (j * n_mem + r, j counted over the whole batch) our placement writes at each
    prompt position (-1: the token's own embedding is kept), as the fixture records it."""
    n_mem, n_vectors = model.n_mem_tokens, sum(docs_per_example) * model.n_mem_tokens
    # Small integers are exact in bf16 and far from any token embedding of this backbone.
    probe = torch.arange(1, n_vectors + 1, dtype=torch.float32).view(-1, n_mem, 1).expand(-1, -1, model.hidden_size)
    embeds = model._replace_memory_embeddings(dec_input_ids, probe, docs_per_example).float()
    constant = (embeds == embeds[..., :1]).all(-1) & (embeds[..., 0] >= 1)
    values = torch.where(constant, embeds[..., 0].round().long(), torch.zeros_like(dec_input_ids))
    return torch.where(values > 0, values - 1, torch.full_like(values, -1)).tolist()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_adapters_in_effect_after_loading(models, name):
    load = EXPECTED["checkpoints"][name]["load"]
    model = models[name]
    assert sorted(model.adapter_names) == sorted(load["adapter_keys_after_from_pretrained"])
    saved = torch.load(CONFORMANCE_DIR / name / "adapters.pth", weights_only=True)
    for adapter, equal in load["adapter_weights_equal_checkpoint"].items():
        ours = model.adapter_state_dict(adapter)
        lora = {k: v for k, v in saved[adapter].items() if "lora_" in k}
        assert all(torch.equal(ours[k], v) for k, v in lora.items()) == equal, adapter
    for adapter, all_zero in load["adapter_lora_B_all_zero"].items():
        b_weights = [v for k, v in model.adapter_state_dict(adapter).items() if "lora_B" in k]
        assert all(not w.any() for w in b_weights) == all_zero, adapter
    assert str(model.dtype).removeprefix("torch.") == load["decoder_dtype"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_special_tokens(models, name):
    recorded = EXPECTED["checkpoints"][name]["tokenizer"]
    model = models[name]
    assert len(model.tokenizer) == recorded["len_tokenizer"]
    assert model.processor.mem_tokens == recorded["mem_tokens"]
    assert model.processor.mem_token_ids == recorded["mem_token_ids"]
    for token, token_id in recorded["added_special_tokens"].items():
        assert model.tokenizer.convert_tokens_to_ids(token) == token_id
    assert model.tokenizer.pad_token_id == recorded["pad_token_id"]
    assert model.tokenizer.padding_side == recorded["padding_side"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_compress_documents(models, tensors, name):
    recorded = expected(name, "compress_documents")
    model = models[name]
    documents = INPUTS["calls"]["compress_documents"]
    inputs, n_truncated = model.processor.encode_documents(documents)
    assert inputs["input_ids"].tolist() == recorded["enc_input_ids"]
    assert inputs["attention_mask"].tolist() == recorded["enc_attention_mask"]
    assert n_truncated == 1  # paris_long is longer than doc_max_length=64 tokens
    embeddings, mse_loss = model.compress_documents(documents)
    reference = tensors[f"{name}.compress_documents.embeddings"]
    assert embeddings.dtype == reference.dtype
    assert torch.equal(embeddings, reference)  # same op order in bf16: bit-identical
    assert mse_loss.item() == recorded["mse_loss"]
    assert torch.equal(model.compress(documents), reference)


def test_generate_from_text(models, tensors):
    recorded = expected("instruct", "generate_from_text")
    model, call = models["instruct"], INPUTS["calls"]["text"]
    prompts = [model.processor.build_prompt(len(d), question=q)[0] for q, d in zip(call["questions"], call["documents"])]
    assert prompts == recorded["prompts"]
    dec = model.processor.tokenize_prompts(prompts)
    assert dec["input_ids"].tolist() == recorded["dec_input_ids"]
    assert dec["attention_mask"].tolist() == recorded["dec_attention_mask"]
    counts = [len(d) for d in call["documents"]]
    assert slot_map(model, dec["input_ids"], counts) == recorded["slot_map"]
    compressed = torch.cat(model._compress_per_question(call["documents"]))
    assert torch.equal(compressed, tensors["instruct.generate_from_text.compressed"])
    inputs_embeds = model._replace_memory_embeddings(dec["input_ids"], compressed, counts)
    assert torch.equal(inputs_embeds, tensors["instruct.generate_from_text.inputs_embeds"])
    assert model.generate_from_text(call["questions"], call["documents"], max_new_tokens=12) == recorded["decoded"]


def test_generate_from_compressed_documents_and_questions(models):
    recorded = expected("instruct", "generate_from_compressed_documents_and_questions")
    model, call = models["instruct"], INPUTS["calls"]["text"]
    compressed = torch.cat(model._compress_per_question(call["documents"]))
    decoded = model.generate_from_compressed_documents_and_questions(call["questions"], compressed, max_new_tokens=12)
    assert decoded == recorded["decoded"]


def test_generate_from_paraphrase(models, tensors):
    recorded = expected("base", "generate_from_paraphrase")
    model, call = models["base"], INPUTS["calls"]["paraphrase"]
    instructions = [i[0] for i in recorded["paraphrase_instruction_index_per_prompt"]]
    prompts = [model.processor.build_prompt(1, task="paraphrase", paraphrase_instruction=i)[0] for i in instructions]
    assert prompts == recorded["prompts"]
    dec = model.processor.tokenize_prompts(prompts)
    assert dec["input_ids"].tolist() == recorded["dec_input_ids"]
    assert slot_map(model, dec["input_ids"], [1, 1]) == recorded["slot_map"]
    compressed = torch.cat(model._compress_per_question(call["documents"]))
    inputs_embeds = model._replace_memory_embeddings(dec["input_ids"], compressed, [1, 1])
    assert torch.equal(inputs_embeds, tensors["base.generate_from_paraphrase.inputs_embeds"])
    random.seed(0)  # Apple draws the instruction with random.choice; the recording seeded it so
    decoded = model.generate_from_paraphrase(call["questions"], call["documents"], max_new_tokens=12)
    assert decoded == recorded["decoded"]


def test_generate_from_questions(models, tensors):
    recorded = expected("e2e", "generate_from_questions")
    model, call = models["e2e"], INPUTS["calls"]["questions"]
    query, _ = model.processor.encode_documents(call["questions"])
    assert query["input_ids"].tolist() == recorded["query_enc_input_ids"]
    query_reps = model.encode_queries(call["questions"])
    torch.testing.assert_close(query_reps, tensors["e2e.generate_from_questions.query_reps"], rtol=0, atol=0)
    candidates = torch.stack(model._compress_per_question(call["documents"]))
    torch.testing.assert_close(
        candidates.flatten(0, 1), tensors["e2e.generate_from_questions.candidate_embeddings"], rtol=0, atol=0
    )
    scores = cosine_scores(query_reps, candidates)
    torch.testing.assert_close(scores, tensors["e2e.generate_from_questions.scores"], rtol=0, atol=1e-3)
    _, topk = differentiable_topk(scores, recorded["differentiable_topk_k"], recorded["differentiable_topk_temperature"])
    assert topk.tolist() == recorded["topk_idx"]
    decoded, topk_idx = model.generate_from_questions(call["questions"], max_new_tokens=12, documents=call["documents"])
    assert topk_idx.tolist() == recorded["topk_idx"]
    assert decoded == recorded["decoded"]
    dec = model.processor.tokenize_prompts(recorded["prompts"])
    assert dec["input_ids"].tolist() == recorded["dec_input_ids"]
    assert slot_map(model, dec["input_ids"], [5, 5]) == recorded["slot_map"]


def test_retrieve_and_answer_agree_with_apple_e2e(models):
    """Our own API on Apple's E2E checkpoint picks the same documents as Apple's generate_from_questions."""
    recorded = expected("e2e", "generate_from_questions")
    model, call = models["e2e"], INPUTS["calls"]["questions"]
    candidates = model._compress_per_question(call["documents"])
    _, indices = model.retrieve(call["questions"], candidates, k=5)
    assert [i.tolist() for i in indices] == recorded["topk_idx"]
    results = model.answer(call["questions"], candidates, k=5, return_dict=True, max_new_tokens=12)
    assert [r["doc_indices"] for r in results] == recorded["topk_idx"]
    assert [r["answer"] for r in results] == [d.strip() for d in recorded["decoded"]]


def test_default_loading_reads_every_adapter():
    """adapter_loading="all" (Apple's evaluation path, pure_inference=True) keeps Instruct's trained decoder."""
    recorded = EXPECTED["checkpoints"]["instruct"]["generate_from_text_with_pure_inference_true"]
    model = ClaraForRAG.from_pretrained(str(CONFORMANCE_DIR / "instruct"))
    saved = torch.load(CONFORMANCE_DIR / "instruct" / "adapters.pth", weights_only=True)["decoder_adapter"]
    ours = model.adapter_state_dict("decoder_adapter")
    assert all(torch.equal(ours[k], v) for k, v in saved.items() if "lora_" in k)
    call = INPUTS["calls"]["text"]
    assert model.generate_from_text(call["questions"], call["documents"], max_new_tokens=12) == recorded["decoded"]


def test_automodel_loads_apple_folder_with_package_imported():
    model = AutoModel.from_pretrained(str(CONFORMANCE_DIR / "e2e"))
    assert isinstance(model, ClaraForRAG)
    assert "query_reasoner_adapter" in model.adapter_names


def test_hub_id_with_subfolder_as_in_apples_readme(tmp_path):
    """`owner/repo/subfolder` resolves through the Hub cache (offline here: a cache laid out as the Hub's)."""
    import shutil

    snapshot = tmp_path / "models--apple--CLaRa-7B-Instruct" / "snapshots" / ("0" * 40)
    shutil.copytree(CONFORMANCE_DIR / "instruct", snapshot / "compression-16")
    (tmp_path / "models--apple--CLaRa-7B-Instruct" / "refs").mkdir()
    (tmp_path / "models--apple--CLaRa-7B-Instruct" / "refs" / "main").write_text("0" * 40)
    model = ClaraForRAG.from_pretrained(
        "apple/CLaRa-7B-Instruct/compression-16",
        cache_dir=str(tmp_path),
        local_files_only=True,
        decoder_model_name=str(CONFORMANCE_DIR / "base_decoder"),  # the override Apple's 7B configs need
        adapter_loading="training_stage",
    )
    call = INPUTS["calls"]["text"]
    decoded = model.generate_from_text(call["questions"], call["documents"], max_new_tokens=12)
    assert decoded == expected("instruct", "generate_from_text")["decoded"]
