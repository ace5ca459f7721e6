"""Convert between Apple's released CLaRa format and this package's safetensors format, both ways.

Apple's folders hold `adapters.pth` (adapter name -> PEFT state dict) and `decoder_first_last_layers.pth` (the
full resized `embed_tokens` / `lm_head`), both pickles. Ours hold `model.safetensors` with the LoRA weights and only
the added-token rows; the other rows are the backbone's own, which `apple_to_clara` checks before dropping them.
"""

import argparse
import json
import os

import torch
from peft import get_peft_model_state_dict
from transformers.utils import logging

from .modeling_clara import APPLE_ADAPTERS_FILE, APPLE_EMBEDDINGS_FILE, ClaraForRAG, load_backbone, resolve_backbone_path

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
    if not model._embeddings_tied():
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
    adapters = {
        name: {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model.decoder, adapter_name=name).items()}
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


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert Apple's CLaRa folders to this package's safetensors format, or back",
        description="Lossless conversion between Apple's released format (adapters.pth + "
        "decoder_first_last_layers.pth) and this package's format (model.safetensors).",
    )
    parser.add_argument("direction", choices=("apple-to-hf", "hf-to-apple"))
    parser.add_argument("source", help="checkpoint folder (or Hub id) to read")
    parser.add_argument("output_dir", help="folder to write")
    parser.add_argument(
        "--decoder-model-name", help="backbone to use instead of the config's decoder_model_name (e.g. a local copy)"
    )
    parser.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    overrides = {"decoder_model_name": args.decoder_model_name} if args.decoder_model_name else {}
    convert = apple_to_clara if args.direction == "apple-to-hf" else clara_to_apple
    convert(args.source, args.output_dir, **overrides)
    print(f"wrote {args.output_dir}")
    return 0


__all__ = ["apple_to_clara", "clara_to_apple"]
