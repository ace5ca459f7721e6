"""Loading a CLaRa for a job: training, evaluation, the index commands and the server get their model here.

[`load_model`] reads a saved CLaRa (a folder or Hub id, ours or Apple's, or `"shipped"`) with `from_pretrained`; any
other name is a backbone (`"embedded"`, a causal LM's name or path) on which a fresh, untrained CLaRa is built. The
model goes to the job's device: the process's accelerator when there is one (each process its own under
`accelerate launch` / `torchrun`), else the CPU.
"""

import json
import os

import torch
from accelerate import PartialState
from transformers import PretrainedConfig
from transformers.utils import logging

from .backbone import EMBEDDED_BACKBONE
from .checkpoints import APPLE_ADAPTERS_FILE, SHIPPED_MODEL
from .modeling_clara import ClaraForRAG

logger = logging.get_logger(__name__)


def distributed_state() -> PartialState:
    """This process's place in a data-parallel job (one process alone when not launched as several)."""
    # Without an accelerator, accelerate forms a process group only when asked for CPU (gloo): otherwise every
    # process launched by `accelerate launch` / `torchrun` would believe it is alone and do all the work.
    return PartialState(cpu=not torch.accelerator.is_available())


def job_device() -> torch.device:
    """The device this process computes on: its accelerator when there is one, else the CPU."""
    return distributed_state().device


def is_clara_checkpoint(name: str | os.PathLike) -> bool:
    """Whether `name` is a saved CLaRa (ours, Apple's or `"shipped"`) rather than a backbone."""
    name = str(name)
    if name == EMBEDDED_BACKBONE:
        return False
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, APPLE_ADAPTERS_FILE)):
            return True
        config_path = os.path.join(name, "config.json")
        if not os.path.isfile(config_path):
            return False
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("model_type") == ClaraForRAG.config_class.model_type
    if name == SHIPPED_MODEL:
        return True
    if _is_local_path(name):  # not a folder (checked above), and not a Hub id either
        return False
    if name.count("/") >= 2:  # Apple's README form `owner/repo/subfolder` names CLaRa checkpoints only
        return True
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError):
        return False  # from_backbone reports what is wrong with the name
    return config_dict.get("model_type") == ClaraForRAG.config_class.model_type


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = "auto",
    seed: int | None = None,
    **config_kwargs,
) -> ClaraForRAG:
    """A CLaRa for a job, on its device, in eval mode.

    Args:
        name_or_path: A saved CLaRa (folder, Hub id, Apple's `owner/repo/subfolder`, or `"shipped"`), or a backbone
            (`"embedded"`, a causal LM's name or path) for a fresh, untrained CLaRa.
        device: Default: [`job_device`].
        dtype: The backbone's dtype; `"auto"` follows its config.
        seed: Seeds torch before a fresh CLaRa is built, so its new token rows and adapters are reproducible.
        config_kwargs: [`ClaraConfig`] fields: the architecture of a fresh CLaRa, or overrides of a saved one's.
    """
    name = os.path.expanduser(str(name_or_path))
    if _is_local_path(name) and not os.path.exists(name):
        raise FileNotFoundError(f"no model at {name}: not a folder of a saved CLaRa or of a backbone")
    if is_clara_checkpoint(name):
        model = ClaraForRAG.from_pretrained(name, torch_dtype=dtype, **config_kwargs)
    else:
        logger.info(f"building a fresh CLaRa on the backbone {name}")
        if seed is not None:
            torch.manual_seed(seed)
        model = ClaraForRAG.from_backbone(name, torch_dtype=dtype, **config_kwargs)
    return model.to(device or job_device()).eval()


def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~"))


__all__ = ["distributed_state", "is_clara_checkpoint", "job_device", "load_model"]
