"""Shared fixtures: tiny random backbones with the embedded (SmolLM2) tokenizer, and paths into ../shared."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from modeling_clara import ClaraForRAG  # noqa: E402
from modeling_clara.modeling_clara import resolve_embedded_backbone  # noqa: E402

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE_DIR = SHARED_DIR / "conformance"
DATA_DIR = SHARED_DIR / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: uses the real embedded backbone (slower)")


@pytest.fixture(autouse=True)
def grad_mode_is_left_on():
    """A test (or code it calls in-process) that switches autograd off globally breaks every later training test
    with an unrelated-looking error; fail the culprit instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("autograd was left disabled (torch.set_grad_enabled(False) outside a scope)")


@pytest.fixture(scope="session")
def embedded_backbone_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted from GGUF once and cached."""
    return resolve_embedded_backbone()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_backbone_dir):
    return AutoTokenizer.from_pretrained(embedded_backbone_dir)


def _save_tiny_backbone(model_cls, config, tokenizer, path: Path) -> Path:
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """Tied-embedding Llama (like SmolLM2); odd sizes (37) catch shape bugs."""
    config = LlamaConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(embedded_tokenizer), tie_word_embeddings=True,
        bos_token_id=embedded_tokenizer.bos_token_id, eos_token_id=embedded_tokenizer.eos_token_id,
    )
    return _save_tiny_backbone(LlamaForCausalLM, config, embedded_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """Untied Mistral (like Mistral-7B, Apple's backbone)."""
    config = MistralConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(embedded_tokenizer), tie_word_embeddings=False,
        bos_token_id=embedded_tokenizer.bos_token_id, eos_token_id=embedded_tokenizer.eos_token_id,
    )
    return _save_tiny_backbone(MistralForCausalLM, config, embedded_tokenizer, tmp_path_factory.mktemp("tiny_mistral"))


TINY_CLARA_KWARGS = dict(doc_max_length=32, compr_rate=8, generation_top_k=2, lora_r=4, max_new_tokens=6)


@pytest.fixture
def tiny_clara(tiny_llama_dir) -> ClaraForRAG:
    """A fresh end-to-end (stage2) CLaRa on the tiny Llama: all three adapters, random LoRA B so none is a no-op."""
    return make_tiny_clara(tiny_llama_dir)


def make_tiny_clara(backbone_dir, seed: int = 0, **overrides) -> ClaraForRAG:
    import torch

    torch.manual_seed(seed)
    model = ClaraForRAG.from_backbone(str(backbone_dir), **{**TINY_CLARA_KWARGS, "training_stage": "stage2", **overrides})
    with torch.no_grad():
        for name, parameter in model.decoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)  # fresh LoRA B is zero, which would make every adapter identical
    return model
