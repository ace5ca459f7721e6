"""CLaRa: documents compressed into memory-token embeddings, retrieved and read in one latent space.

One causal LM, three LoRA adapters: `encoder_adapter` compresses a document into `n_mem_tokens` hidden states,
`query_reasoner_adapter` maps a question there, `decoder_adapter` answers from the selected documents' states.
arXiv 2511.18659. The input layouts, prompts and numerics reproduce Apple's reference implementation
(apple/ml-clara `openrlhf/models/modeling_clara.py` at 857c3cf); `tests/test_conformance.py` checks them against
outputs recorded from that code.

This file holds the model, its output, and the retrieval math it trains with, read top to bottom: compress,
retrieve, select, answer, and the training forward one mode per method. Beside it, and carried with it into every
saved checkpoint (`trust_remote_code`): its mixins `adapters_clara.py` (the LoRA adapters and the one door for
switching them), `apple_methods_clara.py` (Apple's method names) and `checkpoint_io_clara.py` (saving and loading);
`configuration_clara.py` (config, stage table), `processing_clara.py` (tokenizer, prompts, `ClaraProcessor`),
`generation.py` (text generation for the bare backbone), `decoding_clara.py` (the fast greedy decoding loop),
`backbone.py` (loading the backbone, the embedded GGUF one)
and `checkpoints.py` (reading Apple's format and ours). They import nothing from the rest of the package, and none
imports this file.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList
from transformers.utils import ModelOutput, logging

# Every sibling file any of these imports is imported here too: loading a local folder with `trust_remote_code`,
# transformers copies only the files this one imports directly.
from .adapters_clara import ClaraAdapterMixin
from .apple_methods_clara import ClaraAppleMethodsMixin
from .backbone import load_backbone, resolve_backbone_path, without_log_notice
from .checkpoint_io_clara import ClaraCheckpointMixin
from .checkpoints import WEIGHTS_FILE  # noqa: F401  (imported by checkpoint_io_clara.py; see above)
from .configuration_clara import (
    DECODER_ADAPTER,
    ENCODER_ADAPTER,
    QUERY_REASONER_ADAPTER,
    STAGES,
    ClaraConfig,
    ClaraLossConfig,
)
from .decoding_clara import ClaraFastGenerator, ShouldStop, cache_keyword, returned_cache
from .generation import configure_greedy_generation, generate_completions
from .processing_clara import (
    ClaraProcessor,
    add_clara_special_tokens,
    check_positive,
    check_questions_and_embeds,
    check_texts,
    load_tokenizer,
)

logger = logging.get_logger(__name__)


@dataclass
class ClaraOutput(ModelOutput):
    """
    Output of [`ClaraForRAG.forward`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            The training objective, which the Trainer minimises as it is, weighted by the model's `loss_config`
            ([`ClaraLossConfig`]): `ce_loss`, plus `mse_weight * mse_loss` on compression batches while the
            compressor trains, plus `retrieval_weight * retrieval_loss` on end-to-end batches with positives (that
            term alone on retrieval-only batches, which have no decoder inputs), plus `memory_contrast_weight *
            memory_contrast_loss` and `memory_cosine_weight * memory_cosine_loss` on compression batches when those
            weights are set (the latter, like the MSE, while the compressor trains).
        ce_loss (`torch.FloatTensor`, *optional*):
            Cross-entropy of the generator on the target tokens (labels != -100).
        mse_loss (`torch.FloatTensor`, *optional*):
            MSE between the mean last-layer state of the document tokens and of the memory tokens.
        retrieval_loss (`torch.FloatTensor`, *optional*):
            Multi-positive InfoNCE of the query reasoner's cosine scores over the gold candidates.
        memory_contrast_loss (`torch.FloatTensor`, *optional*):
            Hinge `max(0, margin + CE(own memory) - CE(another example's memory))`, averaged over the examples
            (compression batches with `loss_config.memory_contrast_weight > 0`).
        memory_cosine_loss (`torch.FloatTensor`, *optional*):
            Hinge `max(0, cosine - memory_cosine_ceiling)` between the flattened memories of every two different
            documents of the batch, averaged over the pairs (compression batches with
            `loss_config.memory_cosine_weight > 0` and two different documents).
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

def place_memory(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, doc_embeds: torch.Tensor, docs_per_example: list[int],
    first_slot_token: int, sep: bool,
) -> torch.Tensor:
    """Prompt embeddings with the document slots filled by compressed documents.

    Document j of example i goes to `first <MEM0> position + j * (n_mem + sep)`, as in ml-clara `_replace_embeddings`
    (so with `sep=False` and several documents they overwrite the `<SEP>` tokens, like Apple's). Out of place, so
    gradients reach `doc_embeds`.

    Args:
        token_embeds (`torch.Tensor` of shape `(batch_size, seq, hidden)`): the prompt's token embeddings.
        input_ids (`torch.LongTensor` of shape `(batch_size, seq)`): the prompt, whose slots start at `first_slot_token`.
        doc_embeds (`torch.Tensor` of shape `(sum(docs_per_example), n_mem, hidden)`), in example order.
        docs_per_example (`list[int]`).
    """
    n_mem = doc_embeds.shape[1]
    slot_length = n_mem + (1 if sep else 0)
    first_memory = (input_ids == first_slot_token).int().argmax(dim=1)
    rows, columns = [], []
    for example, n_docs in enumerate(docs_per_example):
        start = first_memory[example] + torch.arange(n_docs * slot_length, device=input_ids.device)
        positions = start.view(n_docs, slot_length)[:, :n_mem].reshape(-1)
        rows.append(torch.full_like(positions, example))
        columns.append(positions)
    rows, columns = torch.cat(rows), torch.cat(columns)
    if columns.numel() and int(columns.max()) >= input_ids.shape[1]:
        raise ValueError("the prompt has fewer document slots than documents to place")
    values = doc_embeds.reshape(-1, doc_embeds.shape[-1]).to(token_embeds.dtype)
    return token_embeds.index_put((rows, columns), values)


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


class ClaraForRAG(ClaraAdapterMixin, ClaraAppleMethodsMixin, ClaraCheckpointMixin, ClaraPreTrainedModel):
    """CLaRa on one causal-LM backbone: compress documents, retrieve them with a question, answer from them.

    Build a fresh model with [`ClaraForRAG.from_backbone`], load a saved one (ours or Apple's released format)
    with [`ClaraForRAG.from_pretrained`].

    Answers decode greedily through [`ClaraFastGenerator`] (the decoder adapter merged into a copy of the weights,
    a key/value cache allocated once) wherever it applies, and through `generate` otherwise (sampling, beams, other
    backbones, training mode); set `model.fast_decoding = False` to always decode with `generate`.
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
        configure_greedy_generation(decoder.generation_config, tokenizer.pad_token_id)
        self._trainable_adapters: tuple[str, ...] = ()
        self.fast_decoding = True
        self._fast_generator = ClaraFastGenerator()
        self._embedding_grad_hook = None
        # The weights of the loss terms are a setting of a training run, not of the model: `ClaraTrainer` sets the
        # run's here (and saves them with its output); without one, `forward` weighs them as Apple's objective does.
        self.loss_config = ClaraLossConfig()
        for name in STAGES[config.training_stage].adapters if adapter_names is None else adapter_names:
            self.add_lora_adapter(name)
        self.post_init()

    def _resize_embeddings(self, mean_resizing: bool) -> None:
        if self.config.base_vocab_size is None:
            self.config.base_vocab_size = self.decoder.get_input_embeddings().weight.shape[0]
        if self.decoder.get_input_embeddings().weight.shape[0] != len(self.tokenizer):
            # Mean-initialised rows for CLaRa's new tokens are the choice made above; transformers' notice about it
            # is nothing a user can act on.
            with without_log_notice("transformers.modeling_utils", "The new embeddings will be initialized"):
                self.decoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=mean_resizing)

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    @property
    def n_mem_tokens(self) -> int:
        return self.config.n_mem_tokens

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

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

    def _encode_documents(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        return memory, F.mse_loss(text_mean, memory.mean(dim=1))

    def _encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query reasoner: `(n_queries, n_mem * hidden)` flattened memory states of the questions."""
        if not self.has_query_reasoner:
            raise ValueError(
                f"this model has no {QUERY_REASONER_ADAPTER!r} (adapters: {self.adapter_names}); retrieval needs an "
                "end-to-end (stage2) CLaRa, or pass the documents to read in order"
            )
        with self.adapter(QUERY_REASONER_ADAPTER):
            states = self._last_hidden_states(input_ids, attention_mask, skip_padding=True)
        return states[:, -self.n_mem_tokens :].flatten(start_dim=1)

    def _encoder_inputs(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """Encoder inputs on the model's device, and how many of `texts` were cut to `doc_max_length` tokens."""
        inputs, n_truncated = self.processor.encode_documents(texts)
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}, n_truncated

    @torch.no_grad()
    def compress(
        self, documents: list[str] | str, batch_size: int = 8, show_progress_bar: bool | None = None,
        skip_padding: bool = False,
    ) -> torch.FloatTensor:
        """Compress documents into memory-token embeddings.

        Args:
            documents (`list[str]`): Texts longer than `config.doc_max_length` tokens are truncated (one info
                log per call counts them).
            batch_size (`int`, *optional*, defaults to 8): Documents per forward pass.
            show_progress_bar (`bool`, *optional*): Default: when there is more than one batch.
            skip_padding (`bool`, *optional*, defaults to `False`): Do not run the columns that are left padding in
                every document of a batch (faster for short documents; equal in fp32 up to rounding, while in bf16
                the last bits may differ from Apple's full layout).
        Returns:
            `torch.FloatTensor` of shape `(n_docs, n_mem_tokens, hidden_size)`, in the model's dtype.
        """
        documents = check_texts(documents, "documents")
        check_positive("batch_size", batch_size)
        batches = [documents[i : i + batch_size] for i in range(0, len(documents), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 1
        embeds, n_truncated = [], 0
        for batch in logging.tqdm(batches, desc="Compressing", disable=not show_progress_bar):
            inputs, batch_truncated = self._encoder_inputs(batch)
            n_truncated += batch_truncated
            if skip_padding:
                with self.adapter(ENCODER_ADAPTER):
                    states = self._last_hidden_states(inputs["input_ids"], inputs["attention_mask"], skip_padding=True)
                embeds.append(states[:, -self.n_mem_tokens :])
            else:
                embeds.append(self._encode_documents(inputs["input_ids"], inputs["attention_mask"])[0])
        self.processor.report_truncation(n_truncated, len(documents), "documents")
        return torch.cat(embeds)

    @torch.no_grad()
    def encode_queries(self, questions: list[str] | str) -> torch.FloatTensor:
        """Query reasoner embeddings, `(n_questions, n_mem_tokens * hidden_size)`."""
        questions = check_texts(questions, "questions")
        inputs, n_truncated = self._encoder_inputs(questions)
        self.processor.report_truncation(n_truncated, len(questions), "questions")
        return self._encode_queries(inputs["input_ids"], inputs["attention_mask"])

    # ----------------------------------------------------------------------------------------------------------
    # Retrieval and generation

    @torch.no_grad()
    def retrieve(
        self, questions: str | list[str], doc_embeds: torch.Tensor | list[torch.Tensor], k: int | None = None
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
        should_stop: Callable[[], bool] | None = None,
        **generate_kwargs,
    ) -> str | list[str] | dict | list[dict]:
        """Answer questions from compressed documents, given (read as [`select_documents`] chooses) or retrieved from
        a [`ClaraIndex`].

        Args:
            questions (`str` or `list[str]`).
            doc_embeds: `(n_docs, n_mem, hidden)` for one question, a list of those for a list of questions.
            k (`int`, *optional*): Documents to read per question; default `config.generation_top_k`.
            return_dict (`bool`): Return `{"answer", "doc_indices", "scores"}` per question instead of the text
                (with an index, `doc_indices` holds document ids).
            max_new_tokens (`int`, *optional*): Defaults to `config.max_new_tokens`.
            index (`ClaraIndex`, *optional*): Retrieve the top-k documents of each question from this index
                instead of passing `doc_embeds`.
            should_stop (`Callable[[], bool]`, *optional*): Asked after every generated token; once it returns
                True, generation ends there and the answers so far are returned (a caller that left).
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
        answers = self._generate_from_embeds(
            questions, memories, max_new_tokens=max_new_tokens, should_stop=should_stop, **generate_kwargs
        )
        answers = [text.strip() for text in answers]
        if return_dict:
            answers = [{"answer": a, "doc_indices": i, "scores": s} for a, i, s in zip(answers, indices, scores)]
        return answers[0] if single else answers

    @torch.no_grad()
    def generate_from_memory(
        self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int | None = None,
        prompt_start: ClaraPromptStart | None = None, should_stop: Callable[[], bool] | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Answer each question from the documents in its memory, read in the given order (no retrieval).

        Args:
            questions (`list[str]`).
            memories (`list[torch.Tensor]`): Per question, `(n_docs, n_mem, hidden)` from `compress` or an index.
            max_new_tokens (`int`, *optional*): Defaults to `config.max_new_tokens`.
            prompt_start ([`ClaraPromptStart`], *optional*): From [`cache_prompt_start`]: the prompt start every
                answer shares is run once, not once per question (a batch's prefill then runs only the rest).
            should_stop (`Callable[[], bool]`, *optional*): Asked after every generated token; once it returns
                True, every answer ends there (a server stops a batch no client waits for any more).
            generate_kwargs: Passed to `generate` (greedy by default).
        Returns the answers, stripped; raises [`PromptTooLongError`] naming the prompts longer than the generator takes.
        """
        questions, memories = self._check_questions_and_embeds(questions, memories)
        texts = self._generate_from_embeds(
            questions, memories, max_new_tokens=max_new_tokens, prompt_start=prompt_start, should_stop=should_stop,
            **generate_kwargs,
        )
        return [text.strip() for text in texts]

    @torch.no_grad()
    def generate_with_backbone(self, prompts: list[str], max_new_tokens: int | None = None, **generate_kwargs) -> list[str]:
        """Completions of the bare backbone (every adapter off) to text prompts already in its chat template, stripped
        and greedy unless `generate_kwargs` ask for sampling: the text-RAG baseline CLaRa is compared with."""
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
            cache = returned_cache(self.decoder(input_ids=torch.tensor([start], device=self.device), use_cache=True))
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
        self, questions: list[str], memories: list[torch.Tensor], task: str = "answer",
        paraphrase_instructions: list[int | None] | None = None, prompt_start: ClaraPromptStart | None = None,
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
        self, questions: list[str], memories: list[torch.Tensor], task: str = "answer",
        max_new_tokens: int | None = None, paraphrase_instructions: list[int | None] | None = None,
        prompt_start: ClaraPromptStart | None = None, should_stop: Callable[[], bool] | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Generate from prompts whose document slots hold `memories[i]` (`(n_docs_i, n_mem, hidden)`); the decoded
        text, unstripped as Apple's methods return it. `should_stop` is asked after each token, by the fast loop or
        as a stopping criterion of `generate`."""
        inputs = self._generator_inputs(questions, memories, task, paraphrase_instructions, prompt_start)
        generate_kwargs = {"do_sample": False, **generate_kwargs}
        generate_kwargs["max_new_tokens"] = max_new_tokens or self.config.max_new_tokens
        cache = None if prompt_start is None else prompt_start.cache_for(len(questions))
        with self.adapter(DECODER_ADAPTER):
            output_ids = None
            if self.fast_decoding:  # None where the fast loop does not implement the options: `generate` runs them
                output_ids = self._fast_generator.generate(
                    self.decoder, DECODER_ADAPTER, **inputs, past_key_values=cache, should_stop=should_stop,
                    **generate_kwargs,
                )
            if output_ids is None:
                if cache is not None:
                    generate_kwargs[cache_keyword(self.decoder)] = cache
                if should_stop is not None:
                    stopping = list(generate_kwargs.pop("stopping_criteria", None) or [])
                    generate_kwargs["stopping_criteria"] = StoppingCriteriaList([*stopping, ShouldStop(should_stop)])
                output_ids = self.decoder.generate(**inputs, **generate_kwargs)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)

    def _replace_memory_embeddings(self, dec_input_ids, doc_embeds, docs_per_example) -> torch.Tensor:
        """The prompt's token embeddings with its document slots holding `doc_embeds` ([`place_memory`])."""
        token_embeds = self.decoder.get_input_embeddings()(dec_input_ids)
        first_slot_token = self.processor.mem_token_ids[0]
        return place_memory(token_embeds, dec_input_ids, doc_embeds, docs_per_example, first_slot_token, self.config.sep)

    def _check_questions_and_embeds(self, questions, doc_embeds) -> tuple[list[str], list[torch.Tensor]]:
        questions, doc_embeds = check_questions_and_embeds(questions, doc_embeds, self.n_mem_tokens, self.hidden_size)
        return questions, [embeds.to(device=self.device, dtype=self.dtype) for embeds in doc_embeds]

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
        """One training step's forward pass: [`forward_end_to_end`] when `query_*` are given (stage 3), else
        [`forward_compression`] (stages 1 and 2). Returns [`ClaraOutput`]."""
        if query_input_ids is not None:
            return self.forward_end_to_end(
                query_input_ids, query_attention_mask, enc_input_ids, enc_attention_mask, candidate_embeds,
                positive_mask, dec_input_ids, dec_attention_mask, labels,
            )
        return self.forward_compression(
            enc_input_ids, enc_attention_mask, dec_input_ids, dec_attention_mask, labels, docs_per_example
        )

    def forward_compression(
        self, enc_input_ids, enc_attention_mask, dec_input_ids, dec_attention_mask, labels=None, docs_per_example=None
    ) -> ClaraOutput:
        """A compression batch: `enc_*` hold every example's documents in order (`docs_per_example`, default an even
        split), compressed with gradients; the generator reads them in that order."""
        doc_embeds, mse_loss = self._encode_documents(enc_input_ids, enc_attention_mask)
        memory_cosine_loss = memory_contrast_loss = None
        if self.loss_config.memory_cosine_weight:
            memory_cosine_loss = memory_cosine_hinge(doc_embeds, enc_input_ids, self.loss_config.memory_cosine_ceiling)
        batch_size = dec_input_ids.shape[0]
        if docs_per_example is None:
            docs_per_example = [doc_embeds.shape[0] // batch_size] * batch_size
        docs_per_example = [int(n) for n in docs_per_example]
        if self.config.training_form == "compressor":
            doc_embeds = doc_embeds.detach()
        decoded = self._decode(dec_input_ids, dec_attention_mask, labels, doc_embeds, docs_per_example)
        if self.loss_config.memory_contrast_weight and labels is not None:
            memory_contrast_loss = self._memory_contrast_loss(
                dec_input_ids, dec_attention_mask, labels, doc_embeds, docs_per_example, decoded.logits
            )
        return ClaraOutput(
            loss=self.loss_config.total_loss(decoded.loss, mse_loss, None, memory_contrast_loss, memory_cosine_loss,
                                             compressor_trains=ENCODER_ADAPTER in self._trainable_adapters),
            ce_loss=decoded.loss,
            mse_loss=mse_loss,
            memory_contrast_loss=memory_contrast_loss,
            memory_cosine_loss=memory_cosine_loss,
            logits=decoded.logits,
        )

    def forward_end_to_end(
        self, query_input_ids, query_attention_mask, enc_input_ids=None, enc_attention_mask=None, candidate_embeds=None,
        positive_mask=None, dec_input_ids=None, dec_attention_mask=None, labels=None,
    ) -> ClaraOutput:
        """An end-to-end batch: the `enc_*` (or precomputed `candidate_embeds`, `(batch, n_candidates, n_mem, hidden)`)
        are each example's candidates, compressed without gradients; the query reasoner picks `generation_top_k` of
        them with the straight-through top-k, and the answer loss trains it. `positive_mask` (`(batch, n_candidates)`)
        adds the contrastive retrieval loss. Without `dec_*` inputs (a retrieval-only batch) the generator does not
        run and the loss is the weighted retrieval loss alone."""
        batch_size, mse_loss, retrieval_loss = query_input_ids.shape[0], None, None
        if candidate_embeds is None:
            with torch.no_grad():  # the compressor is frozen end to end: its MSE is reported, not trained
                candidate_embeds, mse_loss = self._encode_documents(enc_input_ids, enc_attention_mask)
            candidate_embeds = candidate_embeds.view(batch_size, -1, *candidate_embeds.shape[1:])
        query_reps = self._encode_queries(query_input_ids, query_attention_mask)
        scores, weights, topk_indices = self._select_top_k(query_reps, candidate_embeds)
        if positive_mask is not None:
            retrieval_loss = contrastive_retrieval_loss(scores, positive_mask.bool(), self.loss_config.topk_temperature)
        if dec_input_ids is None:  # a retrieval-only batch
            if retrieval_loss is None:
                raise ValueError("an end-to-end batch without decoder inputs trains on the retrieval loss: give positive_mask")
            return ClaraOutput(loss=self.loss_config.retrieval_weight * retrieval_loss, mse_loss=mse_loss,
                               retrieval_loss=retrieval_loss, topk_indices=topk_indices, retrieval_scores=scores)
        selected = torch.einsum("bkn,bnmh->bkmh", weights.to(candidate_embeds.dtype), candidate_embeds)
        k = selected.shape[1]
        decoded = self._decode(dec_input_ids, dec_attention_mask, labels, selected.flatten(0, 1), [k] * batch_size)
        return ClaraOutput(
            loss=self.loss_config.total_loss(decoded.loss, retrieval_loss=retrieval_loss),
            ce_loss=decoded.loss,
            mse_loss=mse_loss,
            retrieval_loss=retrieval_loss,
            logits=decoded.logits,
            topk_indices=topk_indices,
            retrieval_scores=scores,
        )

    def _select_top_k(self, query_reps: torch.Tensor, candidate_embeds: torch.Tensor):
        """`(scores, weights, indices)`: cosine scores of each question's candidates `(batch, n_candidates, n_mem,
        hidden)` and the straight-through top `generation_top_k` of them (all, when fewer)."""
        scores = cosine_scores(query_reps, candidate_embeds)
        k = min(self.config.generation_top_k, candidate_embeds.shape[1])
        weights, indices = differentiable_topk(scores, k, self.loss_config.topk_temperature)
        return scores, weights, indices

    def _decode(self, dec_input_ids, dec_attention_mask, labels, doc_embeds, docs_per_example):
        """The generator (decoder adapter) on prompts whose document slots hold `doc_embeds`."""
        inputs_embeds = self._replace_memory_embeddings(dec_input_ids, doc_embeds, docs_per_example)
        with self.adapter(DECODER_ADAPTER):
            return self.decoder(inputs_embeds=inputs_embeds, attention_mask=dec_attention_mask, labels=labels)

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
        other_logits = self._decode(dec_input_ids, dec_attention_mask, None, others, docs_per_example).logits
        own_ce, other_ce = (per_example_cross_entropy(scores, labels) for scores in (logits, other_logits))
        return F.relu(self.loss_config.memory_contrast_margin + own_ce - other_ce).mean()


ClaraConfig.register_for_auto_class()
ClaraForRAG.register_for_auto_class("AutoModel")

__all__ = ["ClaraForRAG", "ClaraOutput", "ClaraPreTrainedModel", "ClaraProcessor", "ClaraPromptStart", "differentiable_topk"]
