"""Training CLaRa's three stages with the Hugging Face `Trainer`.

| `--stage`  | Apple      | data (see `data.py`)                | trains                           | loss                     |
|------------|------------|-------------------------------------|----------------------------------|--------------------------|
| `pretrain` | `stage1`   | doc -> QA lines or paraphrase       | encoder + decoder, memory rows   | CE + mse_weight * MSE    |
| `instruct` | `stage1_2` | question + top-k docs -> answer     | encoder + decoder, memory rows   | CE + mse_weight * MSE    |
| `e2e`      | `stage2`   | question + candidates (+ pos_index) | query reasoner + decoder         | CE (+ retrieval_weight * |
|            |            |                                     |                                  | InfoNCE over pos_index)  |

Each stage starts from the previous stage's saved model (`clara train --model <output of the previous stage>`), or from
a backbone (`--model embedded`, a Hub id or a path). A stage-3 run from a model without a query reasoner creates it as a
copy of the encoder adapter (`--query_reasoner_init encoder`, Apple's chaining and the paper's better choice) or as a
fresh LoRA (`fresh`). Stage-3 candidates are compressed by the frozen encoder without gradients (its MSE is logged only).
The loss is the model's own (`ClaraForRAG.forward`, weighted by the `mse_weight` / `retrieval_weight` these arguments
write into its config); the trainer logs its terms.

    clara train --stage pretrain --model embedded --data pretrain.jsonl --output_dir runs/stage1
    clara train --stage instruct --model runs/stage1 --data instruct.jsonl --output_dir runs/stage2
    clara train --stage e2e --model runs/stage2 --data e2e.jsonl --output_dir runs/stage3

Every `TrainingArguments` option works (`--gradient_accumulation_steps`, `--gradient_checkpointing`,
`--resume_from_checkpoint latest`, ...), and so do `torchrun` / `accelerate launch` for data parallelism.
"""

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig, Trainer, TrainingArguments
from transformers.trainer_utils import enable_full_determinism, get_last_checkpoint, set_seed
from transformers.utils import logging

from .backbone import EMBEDDED_BACKBONE
from .checkpoints import APPLE_ADAPTERS_FILE
from .configuration_clara import (
    DECODER_ADAPTER,
    DEFAULT_MSE_WEIGHT,
    DEFAULT_RETRIEVAL_WEIGHT,
    ENCODER_ADAPTER,
    MEMORY_PROJECTIONS,
    QUERY_REASONER_ADAPTER,
    STAGE_NAMES,
    STAGES,
    STAGES_BY_NAME,
)
from .data import load_clara_jsonl, make_collator, unique_candidates, with_channel_rows, with_reconstruction_rows
from .modeling_clara import ClaraForRAG

logger = logging.get_logger(__name__)

# Recipes change the defaults of Apple's scripts (learning rates and schedulers in `configuration_clara.STAGES`, its
# loss weights); an explicit argument still wins. "apple" is Apple's, which Apple's checkpoints were trained with;
# "small" was measured to make a small backbone read its memory on a CPU budget (README, "Teaching a small backbone to
# read its memory"). `channel_rows`: stage-1 rows of random word lists (doc = target) mixed in per training row: the
# language-model prior cannot predict them, so from the first step only memory lowers their loss.
RECIPES = {
    "apple": {"pretrain": {}, "instruct": {}, "e2e": {}},
    "small": {
        # The memory-cosine hinge (below) in stage 1 too: an untrained compressor writes memories with a cosine of
        # 0.896 between two rung-3a passages; with the hinge rung 3a passed in 3 of 3 runs at 200 steps, without it
        # in 0 of 2 (earlier runs without it: 1 of 3 passed by step 300). With it the recipe climbs every rung.
        "pretrain": {"mse_weight": 0.0, "channel_rows": 0.67, "learning_rate": 5e-4, "lr_scheduler_type": "constant",
                     "memory_cosine_weight": 50.0},
        # Answer loss alone lets the compressor collapse to one memory for every document and the generator answer
        # from its prior (ladder rung 2); the memory contrast asks each answer to cost less from its own memory than
        # from another example's. With the contrast alone rung 2 opened in 4 of 13 runs: the compressor starts with
        # (and can stay at) one passage-independent memory (cosine 0.983 between passages), where the contrast has
        # nothing to work with. The memory-cosine hinge forbids that from the first steps (weight 50: its gradient is
        # small; README), and rung 2 then opened in all 4 runs. It ends with a decay: at a constant rate the answer CE
        # plateaued (rung 2: 0.36-0.37), 100 decaying steps took it to 0.195.
        "instruct": {"mse_weight": 0.0, "learning_rate": 2e-4, "lr_scheduler_type": "warmup_stable_decay",
                     "memory_contrast_weight": 1.0, "memory_cosine_weight": 50.0},
        "e2e": {"learning_rate": 5e-5, "retrieval_weight": 1.0},
    },
}
# warmup_stable_decay without `num_decay_steps` in lr_scheduler_kwargs decays over this share of the training steps.
WSD_DECAY_SHARE = 0.2
QUERY_REASONER_INITS = ("encoder", "fresh")
# Architecture fields: a fresh model takes them, a checkpoint must already have them.
ARCHITECTURE_FIELDS = ("doc_max_length", "compr_rate", "lora_r", "memory_projection")
MEMORY_ROW_INITS = ("mean", "spread")


@dataclass
class ClaraTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] for CLaRa, with the defaults of Apple's training scripts.

    Args:
        stage (`str`, *optional*, defaults to `"pretrain"`):
            `"pretrain"` (Apple `stage1`), `"instruct"` (`stage1_2`) or `"e2e"` (`stage2`); decides the data format, the
            collator, which adapters train and the loss.
        recipe (`str`, *optional*, defaults to `"apple"`):
            Defaults for the arguments below that are not given: `"apple"` (Apple's scripts) or `"small"` (for small
            backbones on little compute: no MSE, random-word channel rows in `pretrain`, higher constant learning
            rates, an InfoNCE warm-up in `e2e`). See `RECIPES`.
        mse_weight (`float`, *optional*):
            Weight of the memory/document MSE while the compressor trains (Apple's `--mse_loss`, lambda = 0.1; the
            `small` recipe's 0); written to the model's config, whose `forward` computes the loss. Logged only in
            `e2e` and with `freeze_compressor`, where the compressor does not train.
        mse_stop_gradient (`bool`, *optional*, defaults to `False`):
            Stop the MSE's gradient on the document-side mean, so only the memory moves toward the document (Apple
            lets both move, which lets them meet at one passage-independent point).
        channel_rows (`float`, *optional*):
            `pretrain`: add this many random-word-list rows per training row (doc = target = 8-12 words drawn from the
            training documents' vocabulary; seeded by `--seed`). Apple: 0; `small`: 0.67.
        reconstruction_rows (`float`, *optional*):
            `instruct`: add this many rows per training row that copy a random row's documents, ask for the first one
            word for word (`data.RECONSTRUCTION_QUESTION`) and answer with it (ICAE's autoencoding mixed into the task;
            seeded by `--seed`). Apple: 0.
        retrieval_weight (`float`, *optional*):
            `e2e`: weight of the contrastive retrieval loss over `pos_index` (a supervised warm-up, Apple's
            `stage2_pretrain_retrieval`; Apple's default 0, `small` 1). Logged in any case.
        memory_contrast_weight (`float`, *optional*):
            `pretrain`/`instruct`: weight of the memory-contrast hinge (the model's `memory_contrast_loss`): each
            target should cost `memory_contrast_margin` nats per token less from its own memory than from the next
            example's. Needs a batch of 2 or more; one more generator pass per step. Apple: 0; `small`'s `instruct`: 1.
        memory_contrast_margin (`float`, *optional*, defaults to 1.0):
            That margin in nats per target token.
        memory_cosine_weight (`float`, *optional*):
            `pretrain`/`instruct`: weight of the memory-cosine hinge (the model's `memory_cosine_loss`): two different
            documents' memories in a batch should have a cosine under `memory_cosine_ceiling`. Apple: 0; `small`: 50
            (`pretrain` and `instruct`).
        memory_cosine_ceiling (`float`, *optional*, defaults to 0.8):
            That ceiling.
        topk_temperature (`float`, *optional*, defaults to 0.02):
            Temperature of the straight-through top-k on cosine scores (Apple's value).
        query_reasoner_init (`str`, *optional*, defaults to `"encoder"`):
            `e2e` from a model without a query reasoner: copy the encoder adapter (`"encoder"`) or start a fresh LoRA
            (`"fresh"`).
        generation_top_k (`int`, *optional*):
            Documents the generator reads: the first k of each `instruct` row, the top-k of the `e2e` candidates.
            Default: the model's `generation_top_k` (5).
        n_candidates (`int`, *optional*):
            `e2e`: trim every row to this many candidates (gold ones kept). Without it all rows need the same number.
        doc_max_length, compr_rate, lora_r (`int`, *optional*):
            Architecture of a fresh model built from a backbone (defaults 256, 16, 16). A checkpoint keeps its own;
            giving a different value is an error.
        memory_projection (`str`, *optional*):
            Fresh models: `"token_embeddings"` feeds the generator token-embedding mixtures instead of raw memory
            states, `"token_norm"` raw states rescaled to a token embedding's norm ([`ClaraConfig`]); default Apple's
            raw states. Architecture too: a checkpoint keeps its own.
        memory_row_init (`str`, *optional*, defaults to `"mean"`):
            Fresh models: the `<MEM*>` input-embedding rows start at the vocabulary mean (`"mean"`, what
            `resize_token_embeddings` and Apple's code give: one vector for every slot) or each at its own draw from
            the vocabulary's per-dimension mean and spread (`"spread"`, [`ClaraForRAG.spread_memory_rows`]). A
            checkpoint keeps its trained rows.
        freeze_compressor (`bool`, *optional*, defaults to `False`):
            `pretrain`/`instruct`: keep the encoder adapter and the memory rows frozen, so only the generator trains
            and learns to read a fixed compressor (a warm-up that stops the compressor from collapsing to memory the
            generator can ignore). `e2e` always freezes the compressor.
        freeze_generator (`bool`, *optional*, defaults to `False`):
            Keep the decoder adapter frozen in any stage: the compressor (or, in `e2e`, the query reasoner) learns to
            write memory the generator as it is can read, as ICAE trains its encoder against a frozen decoder. A
            generator that trains alongside can instead learn to ignore the memory.
        cache_candidate_memory (`bool`, *optional*, defaults to `False`):
            `e2e`: compress every distinct candidate document of the training (and evaluation) data once, before the
            first step, and read their memory from that cache instead of compressing each batch's candidates again.
            The compressor is frozen in `e2e`, so the memory is the same, except that the cache is computed as at
            inference (no LoRA dropout). Steps then cost the query reasoner and the generator only (~10x faster on
            the shipped model's data); the cache holds `n_docs * n_mem * hidden` floats in memory.
        retrieval_only (`bool`, *optional*, defaults to `False`):
            `e2e`: train the query reasoner on the retrieval loss (`retrieval_weight`, which must be > 0) over
            `pos_index` alone, as Apple's `stage2_pretrain_retrieval` warm-up; the generator does not run, so a step
            costs the question pass only. Implies `freeze_generator`.
        in_batch_negatives (`bool`, *optional*, defaults to `False`):
            With `retrieval_only` and `cache_candidate_memory`: every question of a batch ranks the distinct
            candidates of all its rows (its own gold texts positive wherever they appear), as DPR's in-batch
            negatives: 16 rows of 4 candidates give each question up to 63 negatives instead of 3, at the cost of
            cosines only.
        optimize_mem_tokens (`bool`, *optional*):
            Train the memory-token embedding rows with the compressor. Default: the model's setting (`True`).
        decoder_max_length (`int`, *optional*):
            Decoder tokens per example (Apple's `--max_len`); default 2048, 1024 for `e2e`.
        learning_rate (`float`, *optional*):
            Default per stage as in Apple's scripts: 1e-4 (`pretrain`, `instruct`), 5e-6 (`e2e`).
        lr_scheduler_type (`str`, *optional*):
            Default per stage: `cosine_with_min_lr` with `min_lr_rate=0.1` (Apple's `min_lr = 0.1 * lr`), `constant` for
            `e2e`. `warmup_stable_decay` (the small recipe's instruct stage) decays over the last fifth of the steps
            unless `lr_scheduler_kwargs` gives `num_decay_steps`.

    Other changed defaults: `adam_beta2=0.95`, `warmup_ratio=0.03` (Apple's), `remove_unused_columns=False` (the
    collators read the raw columns), `report_to="none"`, `logging_steps=10`.
    """

    stage: str = field(
        default="pretrain",
        metadata={"help": "CLaRa stage: pretrain (stage1), instruct (stage1_2), e2e (stage2).", "choices": STAGE_NAMES},
    )
    recipe: str = field(
        default="apple",
        metadata={"help": "Defaults of the arguments not given: apple (Apple's scripts) or small.", "choices": tuple(RECIPES)},
    )
    mse_weight: float | None = field(
        default=None, metadata={"help": "Weight of the memory/document MSE (compression stages; apple 0.1, small 0)."}
    )
    mse_stop_gradient: bool = field(
        default=False, metadata={"help": "No MSE gradient into the document-side mean (only the memory moves)."}
    )
    channel_rows: float | None = field(
        default=None, metadata={"help": "pretrain: random-word-list rows added per training row (apple 0, small 0.67)."}
    )
    reconstruction_rows: float | None = field(
        default=None,
        metadata={"help": "instruct: rows asking for the first document verbatim, added per training row (apple 0)."},
    )
    retrieval_weight: float | None = field(
        default=None, metadata={"help": "e2e: weight of the InfoNCE retrieval loss over pos_index (apple 0, small 1)."}
    )
    memory_contrast_weight: float | None = field(
        default=None,
        metadata={"help": "pretrain/instruct: weight of the own-vs-other-memory hinge (apple 0, small instruct 1)."},
    )
    memory_contrast_margin: float = field(
        default=1.0, metadata={"help": "Margin of that hinge, nats per target token."}
    )
    memory_cosine_weight: float | None = field(
        default=None,
        metadata={
            "help": "pretrain/instruct: weight of the hinge on two documents' memory cosine (apple 0, small instruct 50)."
        },
    )
    memory_cosine_ceiling: float = field(
        default=0.8, metadata={"help": "Cosine between two documents' memories that the hinge tolerates."}
    )
    topk_temperature: float = field(default=0.02, metadata={"help": "Temperature of the straight-through top-k."})
    query_reasoner_init: str = field(
        default="encoder",
        metadata={
            "help": "e2e without a query reasoner: copy the encoder adapter or start fresh.",
            "choices": QUERY_REASONER_INITS,
        },
    )
    generation_top_k: int | None = field(
        default=None, metadata={"help": "Documents the generator reads (default: the model's generation_top_k)."}
    )
    n_candidates: int | None = field(
        default=None, metadata={"help": "e2e: trim every row to this many candidates (gold ones kept)."}
    )
    doc_max_length: int | None = field(default=None, metadata={"help": "Fresh models: document tokens read (256)."})
    compr_rate: int | None = field(default=None, metadata={"help": "Fresh models: document tokens per memory token (16)."})
    lora_r: int | None = field(default=None, metadata={"help": "Fresh models: LoRA rank of every adapter (16)."})
    memory_projection: str | None = field(
        default=None,
        metadata={
            "help": "Fresh models: 'token_embeddings' feeds the generator token-embedding mixtures, 'token_norm' raw "
            "states at a token embedding's norm (default: raw states).",
            "choices": [projection for projection in MEMORY_PROJECTIONS if projection is not None],
        },
    )
    memory_row_init: str = field(
        default="mean",
        metadata={
            "help": "Fresh models: memory-token rows at the vocabulary mean (HF's resize, Apple's) or 'spread' at the "
            "vocabulary's per-dimension spread.",
            "choices": MEMORY_ROW_INITS,
        },
    )
    freeze_compressor: bool | None = field(
        default=None,
        metadata={"help": "pretrain/instruct: train the generator only, on a frozen compressor (default: False)."},
    )
    freeze_generator: bool = field(
        default=False, metadata={"help": "Any stage: keep the decoder adapter frozen; train the compressor/reasoner."}
    )
    cache_candidate_memory: bool = field(
        default=False,
        metadata={"help": "e2e: compress every distinct candidate once before training (the compressor is frozen)."},
    )
    retrieval_only: bool = field(
        default=False,
        metadata={"help": "e2e: train the query reasoner on the retrieval loss alone; the generator does not run."},
    )
    in_batch_negatives: bool = field(
        default=False,
        metadata={"help": "With --retrieval_only and --cache_candidate_memory: rank every candidate of the batch."},
    )
    optimize_mem_tokens: bool | None = field(
        default=None, metadata={"help": "Train the memory-token embedding rows with the compressor (default: model's)."}
    )
    decoder_max_length: int | None = field(
        default=None, metadata={"help": "Decoder tokens per example (default 2048; 1024 for e2e)."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate (default: 1e-4, e2e 5e-6, as Apple's scripts)."}
    )
    lr_scheduler_type: str | None = field(
        default=None, metadata={"help": "Scheduler (default: cosine_with_min_lr with min_lr_rate 0.1; e2e constant)."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "Beta2 for AdamW (Apple's 0.95)."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Linear warmup over this fraction of the steps."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep False: the CLaRa collators read the dataset's own columns."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self):
        if self.stage not in STAGES_BY_NAME:
            raise ValueError(f"stage={self.stage!r} is not one of {STAGE_NAMES}")
        if self.query_reasoner_init not in QUERY_REASONER_INITS:
            raise ValueError(f"query_reasoner_init={self.query_reasoner_init!r} is not one of {QUERY_REASONER_INITS}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} is not one of {tuple(RECIPES)}")
        stage = STAGES_BY_NAME[self.stage]
        defaults = {
            "mse_weight": DEFAULT_MSE_WEIGHT,
            "retrieval_weight": DEFAULT_RETRIEVAL_WEIGHT,
            "channel_rows": 0.0,
            "reconstruction_rows": 0.0,
            "memory_contrast_weight": 0.0,
            "memory_cosine_weight": 0.0,
            "learning_rate": stage.learning_rate,
            "lr_scheduler_type": stage.lr_scheduler_type,
            "freeze_compressor": False,
        }
        defaults.update(RECIPES[self.recipe][self.stage])
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.freeze_compressor and self.stage == "e2e":
            raise ValueError("freeze_compressor=True is for the pretrain and instruct stages; e2e always freezes it")
        if self.freeze_compressor and self.freeze_generator:
            raise ValueError("freeze_compressor=True and freeze_generator=True together leave nothing to train")
        weights = ("mse_weight", "retrieval_weight", "memory_contrast_weight", "memory_cosine_weight")
        if any(getattr(self, name) < 0 for name in weights):
            raise ValueError(
                "loss weights must be >= 0, got " + ", ".join(f"{name}={getattr(self, name)}" for name in weights)
            )
        if not -1 <= self.memory_cosine_ceiling < 1:
            raise ValueError(f"memory_cosine_ceiling={self.memory_cosine_ceiling} must be in [-1, 1)")
        if self.memory_cosine_weight and self.stage == "e2e":
            raise ValueError("memory_cosine_weight is for the pretrain and instruct stages (e2e's compressor is frozen)")
        if self.memory_contrast_weight and self.stage == "e2e":
            raise ValueError("memory_contrast_weight is for the pretrain and instruct stages (e2e picks its memory)")
        if self.memory_contrast_weight and self.per_device_train_batch_size < 2:
            raise ValueError(
                f"memory_contrast_weight needs per_device_train_batch_size >= 2 (another example's memory), "
                f"got {self.per_device_train_batch_size}"
            )
        if self.retrieval_only:
            if self.stage != "e2e" or not self.retrieval_weight > 0:
                raise ValueError(
                    f"retrieval_only trains on the retrieval loss: it needs stage='e2e' and retrieval_weight > 0, got "
                    f"stage={self.stage!r}, retrieval_weight={self.retrieval_weight}"
                )
            self.freeze_generator = True  # the generator does not run
        if self.in_batch_negatives and not (self.retrieval_only and self.cache_candidate_memory):
            raise ValueError("in_batch_negatives needs retrieval_only=True and cache_candidate_memory=True")
        if self.cache_candidate_memory and self.stage != "e2e":
            raise ValueError(f"cache_candidate_memory is for the e2e stage (its frozen compressor), not {self.stage!r}")
        if self.reconstruction_rows < 0 or (self.reconstruction_rows and self.stage != "instruct"):
            raise ValueError(
                f"reconstruction_rows={self.reconstruction_rows} must be >= 0, and is for the instruct stage only"
            )
        if self.memory_row_init not in MEMORY_ROW_INITS:
            raise ValueError(f"memory_row_init={self.memory_row_init!r} is not one of {MEMORY_ROW_INITS}")
        if self.channel_rows < 0 or (self.channel_rows and self.stage != "pretrain"):
            raise ValueError(f"channel_rows={self.channel_rows} must be >= 0, and is for the pretrain stage only")
        if not self.topk_temperature > 0:
            raise ValueError(f"topk_temperature={self.topk_temperature} must be > 0")
        if self.lr_scheduler_type == "cosine_with_min_lr" and not self.lr_scheduler_kwargs:
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
        if self.decoder_max_length is None:
            self.decoder_max_length = stage.decoder_max_length
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # Without `use_cpu`, accelerate starts no process group on a CPU-only machine: every torchrun process
            # would train alone on all the data. With it, the processes form a gloo group (data parallel).
            logger.info("No accelerator: data parallelism over CPU processes (gloo), as with --use_cpu")
            self.use_cpu = True
        super().__post_init__()


@dataclass
class ClaraScriptArguments:
    """What `clara train` reads besides the [`ClaraTrainingArguments`]."""

    model: str = field(
        metadata={
            "help": "Backbone (`embedded`, Hub id or path) for a fresh CLaRa, or a CLaRa checkpoint (e.g. the previous "
            "stage's output)."
        }
    )
    data: str = field(metadata={"help": "Training JSONL in the stage's format (see modeling_clara/data.py)."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation JSONL in the same format."})
    eval_holdout: float = field(
        default=0,
        metadata={"help": "Hold out this many rows of --data for evaluation (a fraction if < 1); seeded by --seed."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Read only the first N rows of --data."})


# --------------------------------------------------------------------------------------------------------------
# Models per stage


def load_model_for_stage(model_name_or_path: str, args: ClaraTrainingArguments) -> ClaraForRAG:
    """A CLaRa checkpoint (ours or Apple's) loaded for `args.stage`, or a fresh CLaRa on a backbone.

    Config fields given in `args` (`generation_top_k`, `optimize_mem_tokens`; architecture fields for a fresh model)
    are applied; [`ClaraTrainer`] then prepares the adapters (see [`prepare_model_for_stage`]).
    """
    stage = STAGES_BY_NAME[args.stage].training_stage
    overrides = {
        name: getattr(args, name) for name in ("generation_top_k", "optimize_mem_tokens") if getattr(args, name) is not None
    }
    architecture = {name: getattr(args, name) for name in ARCHITECTURE_FIELDS if getattr(args, name) is not None}
    if not is_clara_checkpoint(model_name_or_path):
        logger.info(f"Building a fresh CLaRa ({stage}) on the backbone {model_name_or_path}")
        model = ClaraForRAG.from_backbone(model_name_or_path, training_stage=stage, **architecture, **overrides)
        if args.memory_row_init == "spread":
            model.spread_memory_rows()
        return model
    if args.memory_row_init != "mean":
        raise ValueError(
            f"memory_row_init={args.memory_row_init!r} is for a fresh model; {model_name_or_path} is a CLaRa checkpoint "
            "and keeps its trained memory rows"
        )
    model = ClaraForRAG.from_pretrained(model_name_or_path, training_stage=stage, **overrides)
    differ = {
        name: (value, getattr(model.config, name))
        for name, value in architecture.items()
        if getattr(model.config, name) != value
    }
    changed = {name: architecture[name] for name in differ}
    if differ and _is_length_curriculum(model.config, changed):
        logger.info(f"Length curriculum: same {model.n_mem_tokens} memory tokens, now reading {differ}")
        return ClaraForRAG.from_pretrained(model_name_or_path, training_stage=stage, **overrides, **changed)
    if differ:
        raise ValueError(
            f"{model_name_or_path} is a CLaRa checkpoint with its own architecture; these arguments differ from it "
            f"(given, checkpoint): {differ}. Drop them, start from a backbone, or keep doc_max_length // compr_rate "
            "(a length curriculum)."
        )
    return model


def _is_length_curriculum(config, changed: dict) -> bool:
    """Whether the `changed` architecture fields are only `doc_max_length`/`compr_rate`, keeping `n_mem_tokens`: the memory tokens,
    their embedding rows and every adapter stay valid, so a model trained on short documents can go on with long
    ones (a curriculum over document length)."""
    if not changed.keys() <= {"doc_max_length", "compr_rate"}:
        return False
    doc_max_length = changed.get("doc_max_length", config.doc_max_length)
    compr_rate = changed.get("compr_rate", config.compr_rate)
    return doc_max_length // compr_rate == config.n_mem_tokens


def is_clara_checkpoint(name: str) -> bool:
    """Whether `name` is a saved CLaRa (ours or Apple's) rather than a backbone."""
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
    if name.count("/") >= 2:  # Apple's README form `owner/repo/subfolder` names CLaRa checkpoints only
        return True
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError):
        return False  # from_backbone reports what is wrong with the name
    return config_dict.get("model_type") == ClaraForRAG.config_class.model_type


def prepare_model_for_stage(model: ClaraForRAG, args: ClaraTrainingArguments) -> None:
    """Set the model up for `args.stage`: `training_stage` and loss settings in its config (so they are saved with
    it), a query reasoner for `e2e` if it has none, and exactly the stage's adapters (plus the memory rows when the
    compressor trains) trainable."""
    config = model.config
    config.training_stage = STAGES_BY_NAME[args.stage].training_stage
    config.mse_weight = args.mse_weight
    config.mse_stop_gradient = args.mse_stop_gradient
    config.retrieval_weight = args.retrieval_weight
    config.memory_contrast_weight = args.memory_contrast_weight
    config.memory_contrast_margin = args.memory_contrast_margin
    config.memory_cosine_weight = args.memory_cosine_weight
    config.memory_cosine_ceiling = args.memory_cosine_ceiling
    config.topk_temperature = args.topk_temperature
    if args.generation_top_k is not None:
        config.generation_top_k = args.generation_top_k
    if args.optimize_mem_tokens is not None:
        config.optimize_mem_tokens = args.optimize_mem_tokens
    if args.stage == "e2e" and not model.has_query_reasoner:
        add_query_reasoner(model, args.query_reasoner_init)
    missing = [name for name in STAGES[config.training_stage].adapters if name not in model.adapter_names]
    if missing:
        raise ValueError(
            f"stage {args.stage!r} needs adapters {missing}, which this model lacks (it has {model.adapter_names})"
        )
    model.set_active_adapters(model.adapter_names)  # peft makes every active adapter trainable: decide that after
    trained = STAGES[config.training_stage].trainable
    frozen = (ENCODER_ADAPTER,) * args.freeze_compressor + (DECODER_ADAPTER,) * args.freeze_generator
    model.set_trainable_adapters([name for name in trained if name not in frozen])


def add_query_reasoner(model: ClaraForRAG, init: str = "encoder") -> None:
    """Add `query_reasoner_adapter`: a copy of `encoder_adapter` (`init="encoder"`, Apple's stage-2 chaining; the
    paper's Table 14 shows it beats random init) or a fresh LoRA with the same configuration (`init="fresh"`)."""
    if init not in QUERY_REASONER_INITS:
        raise ValueError(f"init={init!r} is not one of {QUERY_REASONER_INITS}")
    if model.has_query_reasoner:
        raise ValueError(f"the model already has a {QUERY_REASONER_ADAPTER!r}")
    model.add_lora_adapter(QUERY_REASONER_ADAPTER, copy_of=ENCODER_ADAPTER if init == "encoder" else None)
    logger.info(f"Added {QUERY_REASONER_ADAPTER} ({'copy of ' + ENCODER_ADAPTER if init == 'encoder' else 'fresh LoRA'})")


# --------------------------------------------------------------------------------------------------------------
# Trainer


class ClaraTrainer(Trainer):
    """`Trainer` for CLaRa: prepares the model for `args.stage`, builds the stage's collator, and logs the loss terms
    (`ce_loss`, `mse_loss`, `retrieval_loss`, and `retrieval_recall` at k in `e2e`) next to the total.

    Args:
        model ([`ClaraForRAG`]): A fresh or loaded CLaRa; set up here with [`prepare_model_for_stage`].
        args ([`ClaraTrainingArguments`]).
        data_collator (*optional*): Default: the stage's collator from `data.make_collator`.
        kwargs: Passed to `Trainer` (`train_dataset`, `eval_dataset`, `callbacks`, ...).
    """

    def __init__(self, model: ClaraForRAG, args: ClaraTrainingArguments, data_collator=None, **kwargs):
        if not isinstance(args, ClaraTrainingArguments):
            raise TypeError(f"ClaraTrainer needs ClaraTrainingArguments, got {type(args).__name__}")
        prepare_model_for_stage(model, args)
        if args.gradient_checkpointing:
            _check_adapter_aware_checkpointing(model, args.gradient_checkpointing_kwargs)
        if data_collator is None:
            e2e_options = {"retrieval_only": True} if args.retrieval_only else {}
            if args.in_batch_negatives:
                e2e_options["in_batch_negatives"] = True
            if args.cache_candidate_memory:
                candidates = unique_candidates(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
                e2e_options["candidate_memory"] = compress_candidates(model, candidates)
            data_collator = make_collator(
                args.stage, model.processor, top_k=model.config.generation_top_k, max_length=args.decoder_max_length,
                **e2e_options,
            )
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        # Each micro-batch loss is a mean over its own target tokens (as Apple's); the forward's **kwargs would make
        # Trainer skip dividing by the accumulation steps, expecting the model to use num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._n_parameters = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # warmup_stable_decay needs its decay length in steps, which only this call knows (max_steps or epochs).
        kwargs = self.args.lr_scheduler_kwargs or {}  # None on transformers 5, {} on 4
        if self.args.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
            self.args.lr_scheduler_kwargs = {**kwargs, "num_decay_steps": max(1, round(WSD_DECAY_SHARE * num_training_steps))}
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        outputs = model(**inputs)  # the model weighs the loss terms (config.mse_weight, config.retrieval_weight)
        for name in ("ce_loss", "mse_loss", "retrieval_loss", "memory_contrast_loss", "memory_cosine_loss"):
            if (term := getattr(outputs, name)) is not None:
                self._metrics[mode][name].append(self.accelerator.gather(term.detach()).mean().item())
        if outputs.topk_indices is not None and inputs.get("positive_mask") is not None:
            recall = self.accelerator.gather(_recall_sums(outputs.topk_indices, inputs["positive_mask"])).view(-1, 2).sum(0)
            if recall[1] > 0:
                self._metrics[mode]["retrieval_recall"].append((recall[0] / recall[1]).item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        self._metrics[mode].clear()
        logs.update(metrics)  # in place: `evaluate()` returns this dict, so the terms reach its caller too
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model) -> list[str]:
        # The embedding matrix trains only its memory rows (a gradient hook zeroes the others); AdamW's decoupled
        # weight decay would still shrink every row, so it gets none.
        embeddings = {id(model.get_input_embeddings().weight)}
        output_embeddings = getattr(model, "decoder", model).get_output_embeddings()
        if output_embeddings is not None:
            embeddings.add(id(output_embeddings.weight))
        excluded = {name for name, parameter in model.named_parameters() if id(parameter) in embeddings}
        return [name for name in super().get_decay_parameter_names(model) if name not in excluded]

    def floating_point_ops(self, inputs: dict) -> int:
        # 6 * parameters * tokens over encoder, query and decoder inputs (the model has no single `input_ids`).
        if self._n_parameters is None:
            self._n_parameters = self.accelerator.unwrap_model(self.model).num_parameters(exclude_embeddings=True)
        tokens = sum(inputs[k].numel() for k in ("enc_input_ids", "query_input_ids", "dec_input_ids") if k in inputs)
        return 6 * self._n_parameters * tokens


def compress_candidates(model: ClaraForRAG, documents: list[str]) -> dict[str, torch.Tensor]:
    """Each document's memory from the model's (frozen) compressor, as at inference: `{text: (n_mem, hidden)}`, on
    the CPU (the Trainer moves each batch to the device)."""
    was_training = model.training
    model.eval()  # no LoRA dropout: the memory the query reasoner will meet at inference
    try:
        memory = model.compress(documents, show_progress_bar=True).cpu()
    finally:
        model.train(was_training)
    logger.info(f"cached the memory of {len(documents)} candidate documents")
    return dict(zip(documents, memory))


def _check_adapter_aware_checkpointing(model: ClaraForRAG, kwargs: dict | None) -> None:
    # Checkpointed layers are recomputed during backward, when the adapter that ran them may no longer be active
    # (the encoder pass runs under `encoder_adapter`, the decoder pass under `decoder_adapter`). Unless the model
    # recomputes each layer under the adapters it ran with (a `context_fn`), the recomputed tensors differ and torch
    # raises CheckpointError, or the gradients silently belong to another adapter.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    functions = [
        getattr(m, "_gradient_checkpointing_func", None)
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False)
    ]
    if not functions or not all("context_fn" in getattr(f, "keywords", {}) for f in functions):
        model.gradient_checkpointing_disable()
        raise NotImplementedError(
            "gradient checkpointing needs ClaraForRAG.gradient_checkpointing_enable to recompute each layer under the "
            "adapter it ran with (torch.utils.checkpoint `context_fn`); this model version does not, so training "
            "with --gradient_checkpointing would fail or mix adapters' gradients"
        )


def _recall_sums(topk_indices: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """`[sum of per-example recall@k, examples with a positive]` (Apple's recall: hits in the top-k / positives)."""
    positive_mask = positive_mask.bool()
    hits = positive_mask.gather(1, topk_indices).sum(1).float()
    positives = positive_mask.sum(1).float()
    has_positive = positives > 0
    recall = (hits[has_positive] / positives[has_positive]).sum()
    return torch.stack([recall, has_positive.sum().float()])


# --------------------------------------------------------------------------------------------------------------
# Running a stage


def train_clara(script_args: ClaraScriptArguments, args: ClaraTrainingArguments, callbacks=None) -> dict:
    """Run one stage: load model and data, train (resuming if asked), save the final model to `args.output_dir`.

    `args.resume_from_checkpoint` may be a checkpoint folder or `"latest"`/`"true"` for the last one in `output_dir`.

    Returns:
        `dict` with `output_dir`, `global_step`, the training metrics and, with evaluation data, the evaluation ones.
    """
    if script_args.eval_data and script_args.eval_holdout:
        raise ValueError("give either --eval_data or --eval_holdout, not both")
    resume = _resolve_resume(args)
    # Seeded before the model exists, as the Trainer seeds only once it is built: a fresh model's LoRA and a new
    # stage's adapters draw their initial weights from torch's generator, which is seeded at random per process.
    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
    model = load_model_for_stage(script_args.model, args)
    train_dataset = load_clara_jsonl(
        script_args.data, args.stage, n_candidates=args.n_candidates, max_samples=script_args.max_train_samples
    )
    if args.channel_rows:
        train_dataset = with_channel_rows(train_dataset, args.channel_rows, args.seed)
    if args.reconstruction_rows:
        train_dataset = with_reconstruction_rows(train_dataset, args.reconstruction_rows, args.seed)
    eval_dataset = None
    if script_args.eval_data:
        eval_dataset = load_clara_jsonl(script_args.eval_data, args.stage, n_candidates=args.n_candidates)
    if script_args.eval_holdout:
        holdout = int(script_args.eval_holdout) if script_args.eval_holdout >= 1 else script_args.eval_holdout
        split = train_dataset.train_test_split(test_size=holdout, seed=args.seed)
        train_dataset, eval_dataset = split["train"], split["test"]
    trainer = ClaraTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks
    )
    train_output = trainer.train(resume_from_checkpoint=resume)
    result = {"output_dir": args.output_dir, "global_step": trainer.state.global_step, **train_output.metrics}
    if eval_dataset is not None:
        final = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
        result.update({k: v for k, v in final[-1].items() if k.startswith("eval_")} if final else trainer.evaluate())
    trainer.save_model(args.output_dir)
    trainer.save_state()  # after evaluating, so trainer_state.json has the final evaluation too
    return result


def _resolve_resume(args: ClaraTrainingArguments) -> str | None:
    resume = args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("false", ""):
        return None
    if str(resume).lower() in ("latest", "true"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no checkpoint-* folder in {args.output_dir}")
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such folder")
    return resume


__all__ = [
    "ClaraScriptArguments",
    "ClaraTrainer",
    "ClaraTrainingArguments",
    "add_query_reasoner",
    "compress_candidates",
    "is_clara_checkpoint",
    "load_model_for_stage",
    "prepare_model_for_stage",
    "train_clara",
]
