"""Convert between Apple's released CLaRa format and this package's safetensors format, both ways.

Apple's folders hold `adapters.pth` (adapter name -> PEFT state dict) and `decoder_first_last_layers.pth` (the
full resized `embed_tokens` / `lm_head`), both pickles. Ours hold `model.safetensors` with the LoRA weights and only
the added-token rows; the other rows are the backbone's own, which `apple_to_clara` checks before dropping them.
"""

import json
import os

import torch
from peft import get_peft_model_state_dict
from transformers.utils import logging

from .backbone import load_backbone, resolve_backbone_path
from .checkpoints import APPLE_ADAPTERS_FILE, APPLE_EMBEDDINGS_FILE
from .modeling_clara import ClaraForRAG

logger = logging.get_logger(__name__)

# Apple's config points at its own remote code.
APPLE_AUTO_MAP = {"AutoConfig": "modeling_clara.CLaRaConfig", "AutoModel": "modeling_clara.CLaRa"}


def apple_to_clara(apple_dir: str, output_dir: str, **overrides) -> ClaraForRAG:
    """Load an Apple folder with every adapter and save it in this package's format.

    Raises `ValueError` if the embedding rows of the original vocabulary differ from the backbone's, since this
    format does not store them (conversion would lose information).
    """
    model = ClaraForRAG.from_pretrained(apple_dir, adapter_loading="all", **overrides)
    _check_original_rows_unchanged(model)
    model.save_pretrained(output_dir)
    logger.info(f"Converted {apple_dir} -> {output_dir} (adapters: {model.adapter_names})")
    return model


def _check_original_rows_unchanged(model: ClaraForRAG) -> None:
    reference = load_backbone(resolve_backbone_path(model.config.decoder_model_name), model.config)
    base = model.config.base_vocab_size
    pairs = [(model.decoder.get_input_embeddings(), reference.get_input_embeddings())]
    if not model.tied_embeddings:
        pairs.append((model.decoder.get_output_embeddings(), reference.get_output_embeddings()))
    for converted, original in pairs:
        if not torch.equal(converted.weight[:base], original.weight[:base].to(converted.weight.dtype)):
            raise ValueError(
                f"{APPLE_EMBEDDINGS_FILE} changes rows of the original vocabulary (max abs difference "
                f"{(converted.weight[:base].float() - original.weight[:base].float()).abs().max():.3g}); this "
                "package's format stores only the added-token rows, so the conversion would not be lossless"
            )


def clara_to_apple(model_dir: str, output_dir: str, **overrides) -> ClaraForRAG:
    """Write a CLaRa saved by this package in Apple's format (for Apple's `modeling_clara.py`)."""
    model = ClaraForRAG.from_pretrained(model_dir, **overrides)
    os.makedirs(output_dir, exist_ok=True)
    # Apple's adapters.pth holds the resized embedding and output layers with each adapter, as peft would choose.
    adapters = {
        name: {k: v.detach().cpu() for k, v in get_peft_model_state_dict(
            model.decoder, adapter_name=name, save_embedding_layers=True).items()}
        for name in model.adapter_names
    }
    torch.save(adapters, os.path.join(output_dir, APPLE_ADAPTERS_FILE))
    # As Apple's `_get_decoder_first_and_last_layer_state_dict`: named_parameters lists a tied lm_head once.
    rows = {
        name: parameter.detach().cpu()
        for name, parameter in model.decoder.named_parameters()
        if "lm_head.weight" in name or "embed_tokens.weight" in name
    }
    torch.save(rows, os.path.join(output_dir, APPLE_EMBEDDINGS_FILE))
    config = model.config.to_dict()
    config["auto_map"] = dict(APPLE_AUTO_MAP)
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    model.tokenizer.save_pretrained(output_dir)
    logger.info(f"Converted {model_dir} -> {output_dir} in Apple's format")
    return model


__all__ = ["apple_to_clara", "clara_to_apple"]
