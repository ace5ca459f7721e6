"""`clara convert`: Apple's format -> ours -> Apple's is lossless, and every format gives Apple's outputs."""

import json

import pytest
import torch

from modeling_clara import ClaraForRAG
from modeling_clara.cli import main

from conftest import CONFORMANCE_DIR

CHECKPOINTS = ("base", "instruct", "e2e")


def _lora_only(adapters: dict) -> dict:
    return {name: {k: v for k, v in state.items() if "lora_" in k} for name, state in adapters.items()}


@pytest.fixture(scope="module", params=CHECKPOINTS)
def converted(request, tmp_path_factory):
    """(name, ours_dir, apple_again_dir) after apple-to-hf then hf-to-apple through the CLI."""
    name = request.param
    ours = tmp_path_factory.mktemp(f"{name}_hf")
    apple_again = tmp_path_factory.mktemp(f"{name}_apple")
    assert main(["convert", "apple-to-hf", "--model", str(CONFORMANCE_DIR / name), "--output-dir", str(ours)]) == 0
    assert main(["convert", "hf-to-apple", "--model", str(ours), "--output-dir", str(apple_again)]) == 0
    return name, ours, apple_again


def test_round_trip_keeps_every_lora_tensor(converted):
    name, _, apple_again = converted
    original = torch.load(CONFORMANCE_DIR / name / "adapters.pth", weights_only=True)
    again = torch.load(apple_again / "adapters.pth", weights_only=True)
    original, again = _lora_only(original), _lora_only(again)
    assert sorted(original) == sorted(again)
    for adapter, state in original.items():
        assert sorted(state) == sorted(again[adapter])
        for key, value in state.items():
            assert torch.equal(value, again[adapter][key]), f"{adapter}.{key} changed"


def test_round_trip_keeps_embedding_matrices(converted):
    name, _, apple_again = converted
    original = torch.load(CONFORMANCE_DIR / name / "decoder_first_last_layers.pth", weights_only=True)
    again = torch.load(apple_again / "decoder_first_last_layers.pth", weights_only=True)
    assert sorted(original) == sorted(again)
    for key, value in original.items():
        assert torch.equal(value, again[key]), key


def test_round_trip_keeps_apple_config_fields(converted):
    name, _, apple_again = converted
    original = json.loads((CONFORMANCE_DIR / name / "config.json").read_text())
    again = json.loads((apple_again / "config.json").read_text())
    assert again["auto_map"] == original["auto_map"]
    # decoder_model_name becomes absolute: the relative one would not resolve from the new folder.
    skipped = {"decoder_model_name", "transformers_version", "_attn_implementation_autoset", "attn_implementation"}
    for key, value in original.items():
        if key not in skipped:
            assert again[key] == value, key


def test_converted_formats_generate_like_the_original(converted):
    name, ours, apple_again = converted
    documents = [["Paris is the capital of France.", "The Seine flows through Paris."]]
    outputs = []
    for folder in (CONFORMANCE_DIR / name, ours, apple_again):
        model = ClaraForRAG.from_pretrained(str(folder))
        embeds = model.compress(documents[0])
        outputs.append((embeds, model.generate_from_text(["Which river?"], documents, max_new_tokens=5)))
    for embeds, text in outputs[1:]:
        assert torch.equal(embeds, outputs[0][0])
        assert text == outputs[0][1]


def test_ours_holds_only_added_rows(converted):
    _, ours, _ = converted
    from safetensors.torch import load_file

    state = load_file(ours / "model.safetensors")
    rows = state["added_tokens.input_embeddings"]
    config = json.loads((ours / "config.json").read_text())
    assert rows.shape[0] == 7  # 4 memory tokens + <AE>, <ENC>, <SEP> (n_mem = 64 // 16)
    assert config["base_vocab_size"] == 49152
    assert all(k.startswith(("encoder_adapter.", "decoder_adapter.", "query_reasoner_adapter.", "added_tokens.")) for k in state)
