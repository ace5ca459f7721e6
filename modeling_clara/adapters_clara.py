"""Adapter plumbing of `ClaraForRAG`: its three LoRA adapters, the one door for switching them, what trains, and
gradient checkpointing that recomputes each layer under the adapters it ran with.

A mixin of `ClaraForRAG` (sentence-transformers' `PeftAdapterMixin` is the pattern); it reads `self.decoder`,
`self.config` and `self.processor` and imports only peft, torch and sibling files, never the model file.
"""

import contextlib
import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from .configuration_clara import ENCODER_ADAPTER, QUERY_REASONER_ADAPTER, STAGES


class ClaraAdapterMixin:
    """The LoRA adapters of a CLaRa (`ClaraForRAG.__init__` sets `_trainable_adapters` and `_embedding_grad_hook`).

    Adapters are created and switched through peft's own API (`inject_adapter_in_model`, the tuner layers'
    `set_adapter`), not transformers' PEFT integration (`decoder.add_adapter`, `decoder.set_adapter`): transformers 5
    refuses every peft release before 0.22 there. Module names stay peft's (`...q_proj.lora_A.encoder_adapter`).
    Every switch goes through [`adapter`] (or [`adapters_disabled`]), which restores the trainable flags peft resets:
    a weight frozen after the forward gets no gradient at `backward()`.
    """

    @property
    def lora_config(self) -> LoraConfig:
        """The LoRA configuration of every adapter: Apple's, the same for all three roles (alpha = 2 * r, dropout
        0.1, all linear layers)."""
        r = self.config.lora_r
        return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.1)

    @property
    def adapter_names(self) -> list[str]:
        """Adapters this model holds."""
        return list(getattr(self.decoder, "peft_config", {}))

    @property
    def has_query_reasoner(self) -> bool:
        return QUERY_REASONER_ADAPTER in self.adapter_names

    @contextmanager
    def adapter(self, name: str):
        """Run a block with one adapter active; restore the active and trainable adapters after."""
        if name not in self.adapter_names:
            raise ValueError(f"adapter {name!r} is not in this model; it has {self.adapter_names}")
        with self._adapters_active([name]):
            yield

    @contextmanager
    def _adapters_active(self, names: list[str]):
        active = self.active_adapter_names
        if active == names:
            yield
            return
        self.set_active_adapters(names)  # peft freezes every other adapter
        self._apply_trainable_flags()
        try:
            yield
        finally:
            self.set_active_adapters(active)
            self._apply_trainable_flags()

    @property
    def active_adapter_names(self) -> list[str]:
        """Adapters the backbone runs with now."""
        for layer in _tuner_layers(self.decoder):
            active = layer.active_adapter
            return [active] if isinstance(active, str) else list(active)
        return []

    def set_active_adapters(self, names: list[str] | tuple[str, ...]) -> None:
        """Make these adapters the active ones. peft also makes their LoRA weights trainable and freezes every other
        adapter's; call `set_trainable_adapters` afterwards to decide what trains."""
        names = list(names)
        unknown = [n for n in names if n not in self.adapter_names]
        if not names or unknown:
            raise ValueError(f"cannot activate adapters {names}: this model has {self.adapter_names}")
        for layer in _tuner_layers(self.decoder):
            layer.set_adapter(names)

    def add_lora_adapter(self, name: str, copy_of: str | None = None) -> None:
        """Create adapter `name` with CLaRa's LoRA configuration and make it the active one.

        Args:
            name (`str`): The new adapter's name.
            copy_of (`str`, *optional*): An existing adapter whose LoRA weights the new one starts from; default:
                fresh LoRA (B = 0, a no-op until trained).
        """
        if name in self.adapter_names:
            raise ValueError(f"the model already has an adapter {name!r}")
        if copy_of is not None and copy_of not in self.adapter_names:
            raise ValueError(f"cannot copy adapter {copy_of!r}: this model has {self.adapter_names}")
        lora_config = self.lora_config
        lora_config.base_model_name_or_path = self.decoder.__dict__.get("name_or_path")  # as transformers records it
        with warnings.catch_warnings():
            # CLaRa's three adapters live on one backbone by design; peft warns about every adapter after the first.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(lora_config, self.decoder, adapter_name=name)
        self.set_active_adapters([name])
        if copy_of is not None:
            set_peft_model_state_dict(self.decoder, self.adapter_state_dict(copy_of), adapter_name=name)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The LoRA weights of adapter `name`, keyed as peft saves them (`...q_proj.lora_A.weight`)."""
        if name not in self.adapter_names:
            raise ValueError(f"adapter {name!r} is not in this model; it has {self.adapter_names}")
        return get_peft_model_state_dict(self.decoder, adapter_name=name, save_embedding_layers=False)

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Set the LoRA weights of the existing adapter `name` from `state`, keyed as [`adapter_state_dict`] returns
        them (e.g. to restart a trained query reasoner from another adapter's weights)."""
        if name not in self.adapter_names:
            raise ValueError(f"adapter {name!r} is not in this model; it has {self.adapter_names}")
        set_peft_model_state_dict(self.decoder, state, adapter_name=name)

    @contextmanager
    def adapters_disabled(self):
        """Run a block on the bare backbone (every adapter off); restore the adapters and trainable flags after."""
        layers = list(_tuner_layers(self.decoder))
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)  # peft re-activates the active adapters and marks them trainable
            self._apply_trainable_flags()

    def set_trainable_adapters(self, names: tuple[str, ...] | list[str] | None = None) -> None:
        """Choose what trains: these adapters' LoRA weights (default: those of `config.training_stage`), plus the
        memory-token embedding rows when `config.optimize_mem_tokens` and the compressor trains. Everything
        else is frozen."""
        names = tuple(STAGES[self.config.training_stage].trainable if names is None else names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(f"cannot train adapters {unknown}: this model has {self.adapter_names}")
        self._trainable_adapters = names
        for parameter in self.parameters():
            parameter.requires_grad = False
        self._apply_trainable_flags()
        # Memory rows feed the compressor; they train with it so a frozen compressor stays frozen (stage 2).
        train_memory_rows = self.config.optimize_mem_tokens and ENCODER_ADAPTER in names
        self.decoder.get_input_embeddings().weight.requires_grad = train_memory_rows
        if train_memory_rows and self._embedding_grad_hook is None:
            self._embedding_grad_hook = self.decoder.get_input_embeddings().weight.register_hook(self._mask_embedding_grad)

    def _mask_embedding_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # Only the memory-token rows of the (possibly tied) embedding matrix may change.
        mask = torch.zeros(grad.shape[0], 1, device=grad.device, dtype=grad.dtype)
        mask[self.processor.mem_token_ids] = 1.0
        return grad * mask

    def _apply_trainable_flags(self) -> None:
        for name, parameter in self.decoder.named_parameters():
            adapter = _lora_adapter_of(name)
            if adapter is not None:
                parameter.requires_grad = adapter in self._trainable_adapters

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **layer_options):
        # Non-reentrant checkpointing: the encoder's inputs are token ids, and reentrant checkpointing would
        # drop the gradients of the LoRA weights inside checkpointed layers.
        # One backbone runs under several adapters per step (encoder, then decoder); a layer recomputed in backward
        # must run under the adapters it ran with in forward, whichever is active when backward reaches it.
        # `layer_options`: transformers 5's Trainer passes `every_n_layers` and `offload` through here; 4 passes none.
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            raise ValueError("ClaraForRAG needs non-reentrant gradient checkpointing (use_reentrant=False)")
        self.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **layer_options)

    def _checkpoint_contexts(self):
        """`torch.utils.checkpoint` context_fn: nothing in forward; the forward-time adapters during recomputation."""
        return contextlib.nullcontext(), self._adapters_active(self.active_adapter_names)


def _tuner_layers(module: torch.nn.Module):
    """The peft layers (LoRA-wrapped linears) inside `module`."""
    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def _lora_adapter_of(parameter_name: str) -> str | None:
    parts = parameter_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return parts[i + 1]
    return None


__all__ = ["ClaraAdapterMixin"]
