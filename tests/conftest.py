"""Shared fixtures: tiny random backbones with a tiny tokenizer built here (no download, no GGUF conversion), the
embedded backbone for the tests that need it, and the files of tests/fixtures (Apple's conformance checkpoints and a
few data rows; see tests/fixtures/README.md)."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from modeling_clara import ClaraForRAG  # noqa: E402
from modeling_clara.backbone import resolve_embedded_backbone  # noqa: E402
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE, SHIPPED_MODEL_DIR  # noqa: E402

REPO_DIR = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_DIR / "examples" / "quickstart.py"
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
CONFORMANCE_DIR = FIXTURES_DIR / "conformance"
DATA_DIR = FIXTURES_DIR / "data"


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


TINY_VOCAB_SIZE = 1000


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled corpus, laid out like SmolLM2's: `<|endoftext|>` (unk),
    `<|im_start|>` (bos, prepended by the post-processor), `<|im_end|>` (eos), and SmolLM2's chat template.

    Byte-level, so any text encodes; ~1000 tokens, so tiny models stay tiny; deterministic (the trainer is).
    """
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(SHIPPED_CORPUS_FILE, encoding="utf-8") as f:
        tokenizer.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                             special_tokens=[("<|im_start|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=special[0], bos_token=special[1],
                                   eos_token=special[2], clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])  # as SmolLM2's: no token_type_ids
    fast.chat_template = Path(SHIPPED_MODEL_DIR, "chat_template.jinja").read_text(encoding="utf-8")
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def _save_tiny_backbone(model_cls, config, tokenizer, path: Path) -> Path:
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_config(tokenizer) -> LlamaConfig:
    """Tied-embedding Llama (like SmolLM2); odd sizes (37) catch shape bugs."""
    return LlamaConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    config = tiny_llama_config(tiny_tokenizer)
    return _save_tiny_backbone(LlamaForCausalLM, config, tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_smollm2_llama_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """The tiny Llama with the embedded (SmolLM2) tokenizer, for tests of that tokenizer's recorded ids."""
    config = tiny_llama_config(embedded_tokenizer)
    return _save_tiny_backbone(LlamaForCausalLM, config, embedded_tokenizer, tmp_path_factory.mktemp("tiny_smollm2"))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Untied Mistral (like Mistral-7B, Apple's backbone)."""
    config = MistralConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tiny_tokenizer), tie_word_embeddings=False,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )
    return _save_tiny_backbone(MistralForCausalLM, config, tiny_tokenizer, tmp_path_factory.mktemp("tiny_mistral"))


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


@dataclass
class DemoRun:
    stdout: str
    stderr: str
    index_dir: Path  # the index of the bundled corpus the demo built and kept


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """`make demo`'s job as a real process, as a first run (no index cached), once per session: the demo's tests
    read its output, and the tests that need the shipped model's index of the bundled corpus read the one it built
    (compressing those 100 passages is the costliest step of a run)."""
    cache_dir = tmp_path_factory.mktemp("demo-cache")
    process = subprocess.run([sys.executable, str(QUICKSTART), "--cache-dir", str(cache_dir)], cwd=REPO_DIR,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    (index_dir,) = [path for path in cache_dir.iterdir() if path.is_dir()]
    return DemoRun(process.stdout, process.stderr, index_dir)
