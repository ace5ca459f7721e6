"""Damaged or foreign checkpoint files give clear errors that name the file; pickles load weights-only."""

import json
import os
import pickle
import shutil

import pytest
import torch

from conftest import CONFORMANCE_DIR, make_tiny_clara
from modeling_clara import ClaraForRAG


@pytest.fixture
def saved_tiny(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "clara")
    return tmp_path / "clara"


@pytest.fixture
def apple_copy(tmp_path):
    folder = tmp_path / "instruct"
    shutil.copytree(CONFORMANCE_DIR / "instruct", folder)
    return folder


def load_apple(folder):
    return ClaraForRAG.from_pretrained(str(folder), decoder_model_name=str(CONFORMANCE_DIR / "base_decoder"))


def test_truncated_safetensors_names_the_file(saved_tiny):
    weights = saved_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        ClaraForRAG.from_pretrained(str(saved_tiny))


def test_missing_weights_name_the_folder(saved_tiny):
    (saved_tiny / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        ClaraForRAG.from_pretrained(str(saved_tiny))


def test_config_of_another_model_type(saved_tiny, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", saved_tiny / "config.json")
    with pytest.raises(ValueError, match="model_type='llama'"):
        ClaraForRAG.from_pretrained(str(saved_tiny))


def test_corrupted_config_json(saved_tiny):
    (saved_tiny / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*config\.json"):
        ClaraForRAG.from_pretrained(str(saved_tiny))


def test_truncated_apple_pickle_names_the_file(apple_copy):
    adapters = apple_copy / "adapters.pth"
    adapters.write_bytes(adapters.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read .*adapters\.pth"):
        load_apple(apple_copy)


def test_pickle_with_code_is_refused(apple_copy):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(apple_copy / "adapters.pth", "wb") as f:
        pickle.dump({"encoder_adapter": Payload()}, f)
    with pytest.raises(ValueError, match=r"cannot read .*adapters\.pth"):
        load_apple(apple_copy)


def test_adapter_of_another_shape_names_file_and_weight(apple_copy):
    adapters = torch.load(apple_copy / "adapters.pth", weights_only=True)
    key = next(k for k in adapters["encoder_adapter"] if "lora_A" in k)
    adapters["encoder_adapter"][key] = torch.zeros(3, 3, dtype=torch.bfloat16)
    torch.save(adapters, apple_copy / "adapters.pth")
    with pytest.raises(ValueError, match=r"adapters\.pth: adapter 'encoder_adapter' weight .* has shape \(3, 3\)"):
        load_apple(apple_copy)


def test_embedding_rows_of_another_shape(apple_copy):
    rows = torch.load(apple_copy / "decoder_first_last_layers.pth", weights_only=True)
    rows["lm_head.weight"] = rows["lm_head.weight"][:-1]
    torch.save(rows, apple_copy / "decoder_first_last_layers.pth")
    with pytest.raises(ValueError, match=r"decoder_first_last_layers\.pth: lm_head\.weight has shape"):
        load_apple(apple_copy)


def test_saved_adapters_of_another_rank(saved_tiny):
    config = json.loads((saved_tiny / "config.json").read_text())
    config["lora_r"] = 8  # the weights were saved with r=4
    (saved_tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: adapter '.*' weight .* has shape"):
        ClaraForRAG.from_pretrained(str(saved_tiny))
