"""The weights file `save_pretrained` writes also loads through `load_state_dict` (Trainer resume path)."""

import torch
from safetensors.torch import load_file

from conftest import make_tiny_clara


def test_load_state_dict_accepts_saved_weights(tiny_mistral_dir, tmp_path):
    trained = make_tiny_clara(tiny_mistral_dir, seed=1)
    with torch.no_grad():  # training also moves the added-token rows
        trained.decoder.get_input_embeddings().weight[-3:] += 1.0
    trained.save_pretrained(tmp_path)
    fresh = make_tiny_clara(tiny_mistral_dir, seed=2)
    docs = ["Paris is the capital of France.", "Water boils at 100 degrees."]
    assert not torch.equal(fresh.compress(docs), trained.compress(docs))

    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)

    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(fresh.compress(docs), trained.compress(docs), rtol=0, atol=0)
    for ours, theirs in zip(fresh.decoder.state_dict().values(), trained.decoder.state_dict().values()):
        assert torch.equal(ours, theirs)


def test_trainer_style_save_ignores_passed_state_dict(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir)
    model.save_pretrained(tmp_path, state_dict=None, safe_serialization=True)  # as Trainer._save calls it
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "added_tokens.input_embeddings" in keys
    assert not any(key.startswith("decoder.") for key in keys)
