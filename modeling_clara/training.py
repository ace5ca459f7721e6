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
The loss is the model's own (`ClaraForRAG.forward`, weighted by the run's [`ClaraLossConfig`], which the trainer hands
to the model and writes with each output as `training_settings.json`); the trainer logs its terms.

    clara train --stage pretrain --model embedded --data pretrain.jsonl --output_dir runs/stage1
    clara train --stage instruct --model runs/stage1 --data instruct.jsonl --output_dir runs/stage2
    clara train --stage e2e --model runs/stage2 --data e2e.jsonl --output_dir runs/stage3

Every `TrainingArguments` option works (`--gradient_accumulation_steps`, `--gradient_checkpointing`,
`--resume_from_checkpoint latest`, ...), and so do `torchrun` / `accelerate launch` for data parallelism.
"""

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field, fields, make_dataclass

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import enable_full_determinism, get_last_checkpoint, set_seed
from transformers.utils import logging

from .checkpoints import read_config, resolve_checkpoint_dir
from .configuration_clara import (
    DECODER_ADAPTER,
    ENCODER_ADAPTER,
    QUERY_REASONER_ADAPTER,
    STAGE_NAMES,
    STAGES,
    STAGES_BY_NAME,
    ClaraLossConfig,
    stage_name,
)
from .data import load_clara_jsonl, make_collator, unique_candidates, with_channel_rows
from .loading import is_clara_checkpoint, load_model
from .modeling_clara import ClaraForRAG

logger = logging.get_logger(__name__)

# Recipes are data files: `recipes/<name>.json` in this package (`apple`, `small`) or any JSON file of that form. A
# recipe sets arguments that were not given, per stage, each value with its reason; Apple's recipe lies under every
# other, and what a recipe leaves unset keeps the argument's own default.
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
BASE_RECIPE = "apple"
TRAINING_SETTINGS_FILE = "training_settings.json"
# warmup_stable_decay without `num_decay_steps` in lr_scheduler_kwargs decays over this share of the training steps.
WSD_DECAY_SHARE = 0.2
QUERY_REASONER_INITS = ("encoder", "fresh")
# Architecture fields: a fresh model takes them, a checkpoint must already have them.
ARCHITECTURE_FIELDS = ("doc_max_length", "compr_rate", "lora_r")
LOSS_FIELDS = tuple(f.name for f in fields(ClaraLossConfig))


def recipe_names() -> list[str]:
    """The recipes that ship with the package."""
    return sorted(name.removesuffix(".json") for name in os.listdir(RECIPES_DIR) if name.endswith(".json"))


def load_recipe(name_or_path: str) -> dict[str, dict]:
    """The values a recipe sets, per stage: `{"pretrain": {"learning_rate": 5e-4, ...}, ...}`.

    Args:
        name_or_path (`str`): A recipe of the package ([`recipe_names`]: `apple`, `small`) or the path of a `.json` file
            `{"description": str, "stages": {stage: {argument: {"value": v, "reason": str}}}}`, where a stage is
            `pretrain`, `instruct` or `e2e` (Apple's names too) and an argument one of [`ClaraTrainingArguments`] whose
            default is unset (`None`), such as the loss weights, `channel_rows`, `learning_rate`.
    """
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(RECIPES_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise ValueError(f"recipe={name_or_path!r} is neither a recipe of this package {recipe_names()} nor a JSON file")
    with open(path, encoding="utf-8") as f:
        try:
            recipe = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"recipe {path} is not valid JSON: {error}") from error
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), dict):
        raise ValueError(f"recipe {path} needs a \"stages\" object: {{stage: {{argument: {{value, reason}}}}}}")
    settable = recipe_settable_arguments()
    values = {}
    for stage, settings in recipe["stages"].items():
        try:
            name = stage_name(stage)
        except ValueError as error:
            raise ValueError(f"recipe {path}: {error}") from error
        values[name] = {}
        for argument, setting in settings.items():
            where = f"recipe {path}, stage {stage!r}, {argument!r}"
            if argument not in settable:
                raise ValueError(f"{where}: not an argument a recipe sets; those are {sorted(settable)}")
            if not isinstance(setting, dict) or setting.keys() != {"value", "reason"} or not setting["reason"]:
                raise ValueError(
                    f"{where}: write it as {{\"value\": ..., \"reason\": \"why this value\"}}, got {setting!r}"
                )
            values[name][argument] = setting["value"]
    return values


def recipe_settable_arguments() -> set[str]:
    """Arguments a recipe may set: CLaRa's own whose default is unset (`None`, so that a given value wins over the
    recipe's), and the learning rate and its schedule."""
    own = ClaraTrainingArguments.__dataclass_fields__.keys() - TrainingArguments.__dataclass_fields__.keys()
    unset = {name for name in own if ClaraTrainingArguments.__dataclass_fields__[name].default is None}
    return unset | {"learning_rate", "lr_scheduler_type"}


# Every field of `ClaraLossConfig` as an argument of `ClaraTrainingArguments`, unset by default so that a recipe can
# set it and a given value wins over the recipe; an argument neither gives takes the field's own default.
ClaraLossArguments = make_dataclass(
    "ClaraLossArguments",
    [
        (f.name, f.type | None, field(default=None, metadata={
            "help": f"{f.metadata['help']} Default: the recipe's, else {f.default}."}))
        for f in fields(ClaraLossConfig)
    ],
    namespace={"__module__": __name__},
)


@dataclass
class ClaraTrainingArguments(TrainingArguments, ClaraLossArguments):
    r"""
    [`TrainingArguments`] for CLaRa, with the defaults of Apple's training scripts.

    Args:
        stage (`str`, *optional*, defaults to `"pretrain"`):
            `"pretrain"` (Apple `stage1`), `"instruct"` (`stage1_2`) or `"e2e"` (`stage2`); decides the data format, the
            collator, which adapters train and the loss.
        recipe (`str`, *optional*, defaults to `"apple"`):
            Values for the arguments below that are not given: a recipe of the package, `"apple"` (Apple's scripts) or
            `"small"` (for small backbones on little compute: no MSE, random-word channel rows in `pretrain`, the
            memory hinges, higher learning rates, an InfoNCE warm-up in `e2e`), or the path of a recipe `.json` file
            (see [`load_recipe`]). Apple's recipe lies under every other.
        mse_weight, retrieval_weight, memory_contrast_weight, memory_contrast_margin, memory_cosine_weight,
        memory_cosine_ceiling, topk_temperature (`float`, *optional*):
            The loss weights, every field of [`ClaraLossConfig`] (documented there); `loss_config` holds them, the
            trainer hands it to the model and writes it to `training_settings.json` in each output.
        channel_rows (`float`, *optional*):
            `pretrain`: add this many random-word-list rows per training row (doc = target = 8-12 words drawn from the
            training documents' vocabulary; seeded by `--seed`). Apple: 0; `small`: 0.67.
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
            giving a different value is an error, except a length curriculum (`doc_max_length` and `compr_rate`
            changed, `doc_max_length // compr_rate` kept).
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
            Default: the recipe's; Apple's scripts: 1e-4 (`pretrain`, `instruct`), 5e-6 (`e2e`).
        lr_scheduler_type (`str`, *optional*):
            Default: the recipe's; Apple's: `cosine_with_min_lr` with `min_lr_rate=0.1` (`min_lr = 0.1 * lr`),
            `constant` for `e2e`. `warmup_stable_decay` (the small recipe's instruct stage) decays over the last fifth of the steps
            unless `lr_scheduler_kwargs` gives `num_decay_steps`.

    Other changed defaults: `adam_beta2=0.95`, `warmup_ratio=0.03` (Apple's), `remove_unused_columns=False` (the
    collators read the raw columns), `report_to="none"`, `logging_steps=10`.
    """

    stage: str = field(
        default="pretrain",
        metadata={
            "help": "CLaRa stage: pretrain, instruct, e2e (Apple's stage1, stage1_2, stage2).", "choices": STAGE_NAMES
        },
    )
    recipe: str = field(
        default=BASE_RECIPE,
        metadata={
            "help": "Values of the arguments not given: a recipe of the package (apple, small) or the path of a recipe "
            ".json file."
        },
    )
    channel_rows: float | None = field(
        default=None, metadata={"help": "pretrain: random-word-list rows added per training row (apple 0, small 0.67)."}
    )
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
    freeze_compressor: bool = field(
        default=False, metadata={"help": "pretrain/instruct: train the generator only, on a frozen compressor."}
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
        default=None, metadata={"help": "Peak learning rate (default: the recipe's; Apple's 1e-4, e2e 5e-6)."}
    )
    lr_scheduler_type: str | None = field(
        default=None,
        metadata={"help": "Scheduler (default: the recipe's; Apple's cosine_with_min_lr, min_lr_rate 0.1; e2e constant)."},
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
            known = f" (Apple's {self.stage!r} is {stage_name(self.stage)!r})" if self.stage in STAGES else ""
            raise ValueError(f"stage={self.stage!r} is not one of {STAGE_NAMES}{known}")
        if self.query_reasoner_init not in QUERY_REASONER_INITS:
            raise ValueError(f"query_reasoner_init={self.query_reasoner_init!r} is not one of {QUERY_REASONER_INITS}")
        recipe = {**load_recipe(BASE_RECIPE).get(self.stage, {}), **load_recipe(self.recipe).get(self.stage, {})}
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.channel_rows is None:
            self.channel_rows = 0.0
        loss = ClaraLossConfig(**{name: getattr(self, name) for name in LOSS_FIELDS if getattr(self, name) is not None})
        for name, value in loss.to_dict().items():
            setattr(self, name, value)
        if self.freeze_compressor and self.stage == "e2e":
            raise ValueError("freeze_compressor=True is for the pretrain and instruct stages; e2e always freezes it")
        if self.freeze_compressor and self.freeze_generator:
            raise ValueError("freeze_compressor=True and freeze_generator=True together leave nothing to train")
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
        if self.channel_rows < 0 or (self.channel_rows and self.stage != "pretrain"):
            raise ValueError(f"channel_rows={self.channel_rows} must be >= 0, and is for the pretrain stage only")
        if self.lr_scheduler_type == "cosine_with_min_lr" and not self.lr_scheduler_kwargs:
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
        if self.decoder_max_length is None:
            self.decoder_max_length = STAGES_BY_NAME[self.stage].decoder_max_length
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # Without `use_cpu`, accelerate starts no process group on a CPU-only machine: every torchrun process
            # would train alone on all the data. With it, the processes form a gloo group (data parallel).
            logger.info("No accelerator: data parallelism over CPU processes (gloo), as with --use_cpu")
            self.use_cpu = True
        super().__post_init__()

    @property
    def loss_config(self) -> ClaraLossConfig:
        """The run's loss weights, as the model's `forward` reads them."""
        return ClaraLossConfig(**{name: getattr(self, name) for name in LOSS_FIELDS})

    def training_settings(self) -> dict:
        """What `training_settings.json` holds: the stage, the recipe, the loss weights, CLaRa's other arguments and
        the learning-rate schedule, as this run resolved them (`config.json` holds the model, not the run)."""
        own = [f.name for f in fields(self) if f.name not in TrainingArguments.__dataclass_fields__]
        settings = {name: getattr(self, name) for name in own if name not in LOSS_FIELDS}
        schedule = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "seed")
        return {**settings, "loss": self.loss_config.to_dict(), **{name: getattr(self, name) for name in schedule}}


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
        return load_model(model_name_or_path, device="cpu", training_stage=stage, **architecture, **overrides)
    saved = read_config(resolve_checkpoint_dir(model_name_or_path, "", None, None, None, False))
    differ = {
        name: (value, getattr(saved, name)) for name, value in architecture.items() if getattr(saved, name) != value
    }
    changed = {name: architecture[name] for name in differ}
    if differ and not _is_length_curriculum(saved, changed):
        raise ValueError(
            f"{model_name_or_path} is a CLaRa checkpoint with its own architecture; these arguments differ from it "
            f"(given, checkpoint): {differ}. Drop them, start from a backbone, or keep doc_max_length // compr_rate "
            "(a length curriculum)."
        )
    if differ:
        logger.info(f"Length curriculum: same {saved.n_mem_tokens} memory tokens, now reading {differ}")
    return load_model(model_name_or_path, device="cpu", training_stage=stage, **overrides, **changed)


def _is_length_curriculum(config, changed: dict) -> bool:
    """Whether the `changed` architecture fields are only `doc_max_length`/`compr_rate`, keeping `n_mem_tokens`: the memory tokens,
    their embedding rows and every adapter stay valid, so a model trained on short documents can go on with long
    ones (a curriculum over document length)."""
    if not changed.keys() <= {"doc_max_length", "compr_rate"}:
        return False
    doc_max_length = changed.get("doc_max_length", config.doc_max_length)
    compr_rate = changed.get("compr_rate", config.compr_rate)
    return doc_max_length // compr_rate == config.n_mem_tokens


def prepare_model_for_stage(model: ClaraForRAG, args: ClaraTrainingArguments) -> None:
    """Set the model up for `args.stage`: `training_stage` in its config, the run's loss weights on the model
    (`model.loss_config`; saved with the run, not in `config.json`), a query reasoner for `e2e` if it has none, and
    exactly the stage's adapters (plus the memory rows when the compressor trains) trainable."""
    config = model.config
    config.training_stage = STAGES_BY_NAME[args.stage].training_stage
    model.loss_config = args.loss_config
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Every checkpoint and the final model carry the settings they were trained with.
        super()._save(output_dir, state_dict=state_dict)
        path = os.path.join(output_dir or self.args.output_dir, TRAINING_SETTINGS_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.args.training_settings(), f, indent=2, sort_keys=True)
            f.write("\n")

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # warmup_stable_decay needs its decay length in steps, which only this call knows (max_steps or epochs).
        kwargs = self.args.lr_scheduler_kwargs or {}  # None on transformers 5, {} on 4
        if self.args.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
            self.args.lr_scheduler_kwargs = {**kwargs, "num_decay_steps": max(1, round(WSD_DECAY_SHARE * num_training_steps))}
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        outputs = model(**inputs)  # the model weighs the loss terms with the run's loss_config
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
    "load_model_for_stage",
    "load_recipe",
    "prepare_model_for_stage",
    "train_clara",
]
