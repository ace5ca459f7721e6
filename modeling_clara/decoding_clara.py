"""Greedy decoding without per-step framework overhead, for Llama-family generators (Llama, SmolLM2, Mistral).

At batch 1 a decoding step of a small model should cost what reading its weights costs. `generate` on a
LoRA-wrapped backbone pays far more: every linear runs its base matmul plus the adapter's dropout, two low-rank
matmuls and a scaling, and each step goes through the generation loop's logits processors, stopping criteria,
mask building and cache bookkeeping. [`ClaraFastGenerator`] keeps the prefill as it is (the backbone's own forward,
so the first token, the prompt-start cache and the left padding are handled as `generate` handles them) and decodes
the following tokens with a loop of its own over the backbone's layers:

- the adapter merged into a copy of each linear's weight (`W + scaling * B @ A`), q/k/v and gate/up concatenated
  into one matmul each, stored input-major (at batch 1 on CPU, `x @ W` over that layout reads the weight faster);
- a key/value cache allocated once for the whole answer, written in place;
- rotary angles for every step computed once, one matmul per layer rotating every query and key head, and no
  attention mask at all for a batch without padding.

The merged copy costs as much memory as the backbone's linears and output head.

It runs on CPU and gives the tokens `generate(do_sample=False)` gives (greedy, `max_new_tokens`, `min_new_tokens`,
stop at the end of sequence, padding after it); any other generation option returns `None` and the caller falls back
to `generate`. A `should_stop` callable, asked once per generated token, ends the loop early (a server stops work no
client waits for any more); [`ShouldStop`] asks it on `generate`'s path, at the same point. The merged weights are
rebuilt when any weight of the backbone changes (training, `load_state_dict`, `.to()`).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, GenerationConfig, PreTrainedModel, StoppingCriteria
from transformers.utils import ModelOutput

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Generation options the loop implements; any other option (sampling, beams, penalties, stop strings...) goes
# through `generate`.
SUPPORTED_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "eos_token_id", "pad_token_id"}
# Generation-config fields that change which token greedy decoding picks, with the value that changes nothing.
NEUTRAL_SETTINGS = {
    "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "min_length": 0, "penalty_alpha": None, "guidance_scale": None,
    "exponential_decay_length_penalty": None, "stop_strings": None, "encoder_repetition_penalty": 1.0,
}


def unsupported_reason(backbone: PreTrainedModel) -> str | None:
    """Why the decoding loop cannot run this backbone, or `None` when it can."""
    config = backbone.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear layers with bias"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r}"
    return None


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword `model.forward` and `model.generate` take a key/value cache by: `cache` on the transformers 5
    releases that renamed it (where `past_key_values` still works but warns), `past_key_values` before them."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: ModelOutput) -> Cache:
    """The key/value cache a forward returned, under either name (see `cache_keyword`)."""
    cache = output.get("cache")
    return cache if cache is not None else output.past_key_values


class ShouldStop(StoppingCriteria):
    """`generate` ends after the token it has just produced once `should_stop()` is true: the fast loop's check, on
    `generate`'s path (every row stops, as the loop stops)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


@dataclass
class GreedySettings:
    """What the decoding loop needs from a generation config."""

    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int | None


def greedy_settings(generation_config: GenerationConfig, generate_kwargs: dict) -> GreedySettings | None:
    """The settings of a greedy decoding the loop implements exactly, or `None` when `generate` must run it."""
    if set(generate_kwargs) - SUPPORTED_OPTIONS:
        return None
    config = GenerationConfig.from_dict({**generation_config.to_dict(), **generate_kwargs})
    if any(getattr(config, name, value) not in (value, None) for name, value in NEUTRAL_SETTINGS.items()):
        return None
    if config.max_new_tokens is None:
        return None
    eos = config.eos_token_id
    eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad_token_id = config.pad_token_id if config.pad_token_id is not None or not eos_token_ids else eos_token_ids[0]
    return GreedySettings(config.max_new_tokens, config.min_new_tokens or 0, eos_token_ids, pad_token_id)


@dataclass
class _LayerWeights:
    """One decoder layer's weights as the loop reads them: merged with the adapter, projections concatenated."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # (hidden, q_out + 2 * kv_out)
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # (hidden, 2 * intermediate)
    down: torch.Tensor


def merged_weight(linear: torch.nn.Module, adapter_name: str | None) -> torch.Tensor:
    """A linear's weight with `adapter_name`'s LoRA merged in (the base weight for `None` or an unwrapped linear)."""
    base = getattr(linear, "base_layer", linear)
    weight = base.weight.detach()
    if adapter_name is not None and adapter_name in getattr(linear, "lora_A", {}):
        weight = weight + linear.get_delta_weight(adapter_name).to(weight.dtype)
    return weight


def _input_major(linears: list[torch.nn.Module], adapter_name: str | None) -> torch.Tensor:
    """`(in, sum of out)`: the linears' merged weights side by side, stored input-major. At batch 1 on CPU, `x @ W`
    over this layout reads the weight up to twice as fast as `F.linear(x, W)` over `(out, in)` (docs/speed.md).
    Written into one buffer, one linear at a time, so building it holds at most one merged linear besides."""
    bases = [getattr(linear, "base_layer", linear).weight for linear in linears]
    stacked = torch.empty(bases[0].shape[1], sum(b.shape[0] for b in bases), dtype=bases[0].dtype,
                          device=bases[0].device)
    start = 0
    for linear, base in zip(linears, bases):
        stacked[:, start : start + base.shape[0]] = merged_weight(linear, adapter_name).t()
        start += base.shape[0]
    return stacked


def _weights_signature(backbone: PreTrainedModel) -> tuple:
    """Changes whenever a weight of the backbone is replaced or modified in place."""
    return tuple((p.data_ptr(), p._version) for p in backbone.parameters())


class ClaraFastDecoder:
    """A Llama-family backbone's weights with one adapter merged in, and the greedy decoding loop over them."""

    def __init__(self, backbone: PreTrainedModel, adapter_name: str | None):
        reason = unsupported_reason(backbone)
        if reason is not None:
            raise ValueError(f"the fast decoder cannot run this backbone: {reason}")
        config = backbone.config
        self.signature = _weights_signature(backbone)
        attention = backbone.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.rotary = backbone.model.rotary_emb
        with torch.no_grad():
            self.layers = [self._layer_weights(layer, adapter_name) for layer in backbone.model.layers]
            self.final_norm = backbone.model.norm.weight.detach()
            self.embedding = backbone.get_input_embeddings().weight.detach()
            self.lm_head = _input_major([backbone.get_output_embeddings()], adapter_name)

    @staticmethod
    def _layer_weights(layer: torch.nn.Module, adapter_name: str | None) -> _LayerWeights:
        attention, mlp = layer.self_attn, layer.mlp
        return _LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=_input_major([attention.q_proj, attention.k_proj, attention.v_proj], adapter_name),
            o=_input_major([attention.o_proj], adapter_name),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=_input_major([mlp.gate_proj, mlp.up_proj], adapter_name),
            down=_input_major([mlp.down_proj], adapter_name),
        )

    def _norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if hidden.dtype == torch.float32:
            return F.rms_norm(hidden, (hidden.shape[-1],), weight, self.eps)
        # As LlamaRMSNorm: normalised in float32, scaled in the model's dtype.
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        return weight * normed.to(hidden.dtype)

    def _rotations(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`(batch, head_dim, head_dim)` matrices `M` with `x @ M` = `x * cos + rotate_half(x) * sin` (Llama's rotary
        embedding): one matmul rotates every query and key head of a layer."""
        half = self.head_dim // 2
        rotate_half = torch.zeros(self.head_dim, self.head_dim, dtype=cos.dtype, device=cos.device)
        rotate_half[half:, :half] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
        rotate_half[:half, half:] = torch.eye(half, dtype=cos.dtype, device=cos.device)
        return torch.diag_embed(cos) + rotate_half * sin[:, None, :]

    def _step(
        self, token_ids: torch.Tensor, rotation: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
        position: int, key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits `(batch, vocab)` for one new token per row, its keys and values written at cache slot `position`.

        `rotation`: `(batch, head_dim, head_dim)` from [`_rotations`] at each row's position; `key_mask`: `(batch, 1,
        1, position + 1)`, True where a row may attend, or `None` when every row attends every slot.
        """
        batch, n_heads, n_kv_heads, head_dim = token_ids.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        rotated_size, q_size = (n_heads + n_kv_heads) * head_dim, n_heads * head_dim
        hidden = F.embedding(token_ids, self.embedding)  # (batch, hidden)
        for layer, layer_keys, layer_values in zip(self.layers, keys, values):
            qkv = self._norm(hidden, layer.input_norm) @ layer.qkv
            qk = torch.bmm(qkv[:, :rotated_size].view(batch, n_heads + n_kv_heads, head_dim), rotation)
            layer_keys[:, :, position] = qk[:, n_heads:]
            layer_values[:, :, position] = qkv[:, rotated_size:].view(batch, n_kv_heads, head_dim)
            # The query heads sharing a key/value head become that head's query rows: no repeated keys.
            attended = F.scaled_dot_product_attention(
                qk[:, :n_heads].view(batch, n_kv_heads, n_heads // n_kv_heads, head_dim),
                layer_keys[:, :, : position + 1], layer_values[:, :, : position + 1], attn_mask=key_mask,
            )  # (batch, kv_heads, group, head_dim)
            hidden = torch.addmm(hidden, attended.reshape(batch, q_size), layer.o)
            gate, up = (self._norm(hidden, layer.post_norm) @ layer.gate_up).chunk(2, dim=-1)
            hidden = torch.addmm(hidden, F.silu(gate) * up, layer.down)
        return (self._norm(hidden, self.final_norm) @ self.lm_head).float()

    @torch.no_grad()
    def generate(
        self, backbone: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        settings: GreedySettings, past_key_values: DynamicCache | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.LongTensor:
        """The new tokens `(batch, n_new)` that `backbone.generate(inputs_embeds=..., attention_mask=...,
        past_key_values=..., do_sample=False)` returns for these settings.

        Args:
            backbone: The model these weights came from, with the same adapter active; it runs the prefill.
            inputs_embeds, attention_mask (`(batch, seq, hidden)`, `(batch, seq)`): the left-padded prompts; with a
                cached prompt start, its `past` slots are the start and only the rest is run.
            past_key_values (`DynamicCache`, *optional*): The cache of the prompt start every row shares; extended.
            should_stop (`Callable[[], bool]`, *optional*): Asked after each new token; once true, the tokens so far
                are returned.
        """
        batch, device = inputs_embeds.shape[0], inputs_embeds.device
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        # Positions count each row's real tokens, as `generate` numbers left-padded rows.
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        cache = past_key_values if past_key_values is not None else DynamicCache()
        prefill = backbone.model(
            inputs_embeds=inputs_embeds[:, past:], attention_mask=attention_mask, position_ids=positions[:, past:],
            use_cache=True, **{cache_keyword(backbone.model): cache},
        )
        logits = backbone.get_output_embeddings()(prefill.last_hidden_state[:, -1]).float()
        prompt_length, total = attention_mask.shape[1], attention_mask.shape[1] + settings.max_new_tokens
        keys, values = self._allocate_cache(returned_cache(prefill), batch, total, inputs_embeds.dtype, device)
        key_mask = None
        if not bool(attention_mask.all()):
            key_mask = torch.ones(batch, 1, 1, total, dtype=torch.bool, device=device)
            key_mask[:, 0, 0, :prompt_length] = attention_mask.bool()
        next_positions = positions[:, -1:] + torch.arange(1, settings.max_new_tokens + 1, device=device)
        cos, sin = self.rotary(inputs_embeds, next_positions)  # (batch, max_new, head_dim)
        eos = torch.tensor(settings.eos_token_ids, device=device, dtype=torch.long)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        tokens = []
        for step in range(settings.max_new_tokens):
            if step > 0:
                slot = prompt_length + step - 1
                mask = None if key_mask is None else key_mask[..., : slot + 1]
                rotation = self._rotations(cos[:, step - 1], sin[:, step - 1])
                logits = self._step(tokens[-1], rotation, keys, values, slot, mask)
            if step < settings.min_new_tokens and eos.numel():
                logits[:, eos] = float("-inf")
            token = logits.argmax(dim=-1)
            if settings.pad_token_id is not None:
                token = torch.where(unfinished, token, settings.pad_token_id)
            tokens.append(token)
            if eos.numel():
                unfinished &= ~torch.isin(token, eos)
                if not bool(unfinished.any()):
                    break
            if should_stop is not None and should_stop():
                break
        return torch.stack(tokens, dim=1)

    def _allocate_cache(
        self, prefill_cache: DynamicCache, batch: int, total: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, keys and values `(batch, kv_heads, total, head_dim)`, the prefill's in their first slots."""
        keys, values = [], []
        for layer_keys, layer_values in _cache_tensors(prefill_cache):
            shape = (batch, self.n_kv_heads, total, self.head_dim)
            keys.append(torch.empty(shape, dtype=dtype, device=device))
            values.append(torch.empty(shape, dtype=dtype, device=device))
            keys[-1][:, :, : layer_keys.shape[2]] = layer_keys
            values[-1][:, :, : layer_values.shape[2]] = layer_values
        return keys, values


def _cache_tensors(cache: DynamicCache):
    """(keys, values) per layer, across the cache layouts of the supported transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


class ClaraFastGenerator:
    """Greedy generation through [`ClaraFastDecoder`] for one backbone, its merged weights kept per adapter.

    [`generate`] returns `None` for what the loop does not do (sampling, beams, an unsupported backbone), so the
    caller runs `generate` instead.
    """

    def __init__(self):
        self._decoders: dict[str | None, ClaraFastDecoder] = {}

    def decoder_for(self, backbone: PreTrainedModel, adapter_name: str | None) -> ClaraFastDecoder | None:
        """The merged weights for `adapter_name` (`None`: the bare backbone), rebuilt when the backbone changed."""
        if unsupported_reason(backbone) is not None:
            return None
        decoder = self._decoders.get(adapter_name)
        if decoder is None or decoder.signature != _weights_signature(backbone):
            self._decoders.pop(adapter_name, None)  # free the stale copy before building the new one
            decoder = self._decoders[adapter_name] = ClaraFastDecoder(backbone, adapter_name)
        return decoder

    def generate(
        self, backbone: PreTrainedModel, adapter_name: str | None, inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor, past_key_values: DynamicCache | None = None,
        should_stop: Callable[[], bool] | None = None, **generate_kwargs,
    ) -> torch.LongTensor | None:
        """The new tokens `backbone.generate` would return for these inputs and options (with `should_stop`: with
        `stopping_criteria=[ShouldStop(should_stop)]`), or `None` when this loop does not implement the options (the
        caller then runs `generate`)."""
        settings = greedy_settings(backbone.generation_config, generate_kwargs)
        # Measured on CPU only; on an accelerator a merged copy of a large backbone would also double its memory.
        if settings is None or backbone.training or inputs_embeds.device.type != "cpu":
            return None
        window = getattr(backbone.config, "sliding_window", None)
        if window is not None and attention_mask.shape[1] + settings.max_new_tokens > window:
            return None  # past the window, Mistral attends only its last `window` tokens; the loop attends all
        decoder = self.decoder_for(backbone, adapter_name)
        if decoder is None:
            return None
        return decoder.generate(backbone, inputs_embeds, attention_mask, settings, past_key_values, should_stop)


__all__ = [
    "ClaraFastDecoder", "ClaraFastGenerator", "GreedySettings", "ShouldStop", "cache_keyword", "greedy_settings",
    "merged_weight", "returned_cache",
    "unsupported_reason",
]
