"""Reading saved CLaRa checkpoints: Apple's released format and this package's.

Apple's folders hold `adapters.pth` (adapter name -> PEFT state dict) and `decoder_first_last_layers.pth` (the full
resized `embed_tokens` / `lm_head`), both pickles read with `weights_only=True`. Ours hold `model.safetensors` with
each adapter's LoRA weights (`<adapter>.<peft key>`) and only the added-token rows. Shipped with a saved checkpoint
beside `modeling_clara.py`.
"""

import os

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers.utils import logging

from .configuration_clara import DECODER_ADAPTER, ENCODER_ADAPTER, QUERY_REASONER_ADAPTER, ClaraConfig

logger = logging.get_logger(__name__)

# Apple's checkpoint files, and ours.
APPLE_ADAPTERS_FILE = "adapters.pth"
APPLE_EMBEDDINGS_FILE = "decoder_first_last_layers.pth"
WEIGHTS_FILE = "model.safetensors"
ADDED_INPUT_ROWS_KEY = "added_tokens.input_embeddings"
ADDED_OUTPUT_ROWS_KEY = "added_tokens.output_embeddings"

# The CLaRa this package ships (three stages trained on the embedded backbone; model_cards/clara-smollm2-135m.md).
SHIPPED_MODEL = "shipped"
SHIPPED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped", "clara-smollm2-135m")
SHIPPED_CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped", "corpus.jsonl")


def resolve_checkpoint_dir(name: str, subfolder: str, revision, cache_dir, token, local_files_only) -> str:
    """A local folder holding the checkpoint; Hub ids (with Apple's `owner/repo/subfolder` form) are downloaded;
    `"shipped"` is the model inside this package."""
    if name == SHIPPED_MODEL and not os.path.isdir(name):
        name = SHIPPED_MODEL_DIR
    local = os.path.join(name, subfolder) if subfolder else name
    if os.path.isdir(local):
        return local
    parts = name.split("/")
    repo_id, path_in_repo = "/".join(parts[:2]), "/".join(p for p in [*parts[2:], subfolder] if p)
    snapshot = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        allow_patterns=[f"{path_in_repo}/*"] if path_in_repo else None,
    )
    return os.path.join(snapshot, path_in_repo)


def read_config(checkpoint_dir: str) -> ClaraConfig:
    """The folder's `config.json` as a `ClaraConfig`; a missing, unreadable or non-CLaRa config is a clear error."""
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {checkpoint_dir} is not a saved CLaRa")
    try:
        config_dict, _ = ClaraConfig.get_config_dict(checkpoint_dir)
    except (OSError, ValueError) as error:  # transformers wraps JSON errors in OSError
        raise ValueError(f"cannot read {path}: {error}") from error
    if config_dict.get("model_type") != ClaraConfig.model_type:
        raise ValueError(
            f"{path} is a config for model_type={config_dict.get('model_type')!r}, not "
            f"{ClaraConfig.model_type!r}; load that folder with its own class, or give a CLaRa checkpoint"
        )
    return ClaraConfig.from_dict(config_dict)


def read_apple_checkpoint(checkpoint_dir: str, decoder: torch.nn.Module) -> tuple[dict, dict]:
    """Apple's folder -> `(adapter name -> PEFT state dict, embedding weights by backbone name)`.

    The embedding weights must fit `decoder` (the backbone, already resized to CLaRa's tokens); the adapters are
    checked key by key when they are loaded.
    """
    adapters_path = os.path.join(checkpoint_dir, APPLE_ADAPTERS_FILE)
    rows_path = os.path.join(checkpoint_dir, APPLE_EMBEDDINGS_FILE)
    adapters = _torch_load(adapters_path)
    if not isinstance(adapters, dict) or not all(isinstance(v, dict) for v in adapters.values()):
        raise ValueError(f"{adapters_path} is not a dict of adapter name -> state dict")
    rows = _torch_load(rows_path) if os.path.isfile(rows_path) else {}
    if not rows:
        logger.warning(f"{rows_path} not found: the added tokens keep fresh embeddings")
    decoder_state = decoder.state_dict()
    for key, value in rows.items():
        if key not in decoder_state or decoder_state[key].shape != value.shape:
            found = tuple(decoder_state[key].shape) if key in decoder_state else "no such weight"
            raise ValueError(f"{rows_path}: {key} has shape {tuple(value.shape)}, the backbone has {found}")
    return adapters, rows


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read {path}: {error}") from error


def read_clara_checkpoint(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """This package's `model.safetensors` -> `(adapter name -> PEFT state dict, added-token rows)`."""
    try:
        state = load_file(path)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {path}: {error}") from error
    return split_clara_state(state, path)


def split_clara_state(state: dict[str, torch.Tensor], path: str) -> tuple[dict, dict]:
    """`save_pretrained`'s flat dict -> (adapter name -> PEFT state dict, added-token rows)."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    rows = {}
    for key, value in state.items():
        if key in (ADDED_INPUT_ROWS_KEY, ADDED_OUTPUT_ROWS_KEY):
            rows[key] = value
            continue
        adapter, _, weight_name = key.partition(".")
        if adapter not in (ENCODER_ADAPTER, QUERY_REASONER_ADAPTER, DECODER_ADAPTER):
            raise ValueError(f"{path}: unexpected weight {key!r}")
        adapters.setdefault(adapter, {})[weight_name] = value
    return adapters, rows


__all__ = ["read_apple_checkpoint", "read_clara_checkpoint", "read_config", "resolve_checkpoint_dir"]
