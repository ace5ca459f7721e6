"""Which weights a result was computed with: one digest for an index's compressor and an evaluation's adapters.

An index refuses a model whose compressor digest differs from its builder's; a resumed evaluation refuses a model
whose adapter digest differs from the one its earlier predictions came from (a name such as `shipped` or a checkpoint
folder can be written again with other weights).
"""

import hashlib
from collections.abc import Mapping

import torch

from .configuration_clara import ENCODER_ADAPTER


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names and float32 values, in name order (independent of device and of dict order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def compressor_weights(model) -> dict[str, torch.Tensor]:
    """What compresses a document besides the backbone: the encoder adapter's LoRA weights and the added token rows."""
    state = model.clara_state_dict()
    return {key: value for key, value in state.items() if key.startswith((f"{ENCODER_ADAPTER}.", "added_"))}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """Every adapter's LoRA weights, by their names in `model.state_dict()`."""
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


__all__ = ["adapter_weights", "compressor_weights", "weights_sha256"]
