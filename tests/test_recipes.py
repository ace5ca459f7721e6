"""Training recipes: recipe files (by name and by path) and `--recipe small`'s defaults, random-word channel rows,
the memory-cosine hinge, the memory contrast, and the length curriculum (a checkpoint goes on with longer documents
when its memory-token count stays the same)."""

import json
import re

import datasets
import pytest
import torch

from conftest import make_tiny_clara
from modeling_clara import cli
from modeling_clara.configuration_clara import ClaraLossConfig
from modeling_clara.data import FEATURES, load_clara_jsonl, with_channel_rows
from modeling_clara.modeling_clara import memory_cosine_hinge
from modeling_clara.training import (
    RECIPES_DIR,
    ClaraTrainer,
    ClaraTrainingArguments,
    load_model_for_stage,
    load_recipe,
    prepare_model_for_stage,
    recipe_names,
)
from test_data import write_jsonl
from test_training import batch_for, instruct_rows, no_dropout, pretrain_rows, training_args


def test_small_recipe_changes_only_the_defaults(tmp_path):
    small = ClaraTrainingArguments(output_dir=str(tmp_path), stage="pretrain", recipe="small")
    assert (small.mse_weight, small.channel_rows, small.learning_rate, small.lr_scheduler_type,
            small.memory_cosine_weight) == (0.0, 0.67, 5e-4, "constant", 50.0)
    explicit = ClaraTrainingArguments(output_dir=str(tmp_path), stage="pretrain", recipe="small", mse_weight=0.1,
                                      channel_rows=0.0, learning_rate=1e-4)
    assert (explicit.mse_weight, explicit.channel_rows, explicit.learning_rate) == (0.1, 0.0, 1e-4)
    e2e = ClaraTrainingArguments(output_dir=str(tmp_path), stage="e2e", recipe="small")
    assert (e2e.retrieval_weight, e2e.learning_rate) == (1.0, 5e-5)
    apple = ClaraTrainingArguments(output_dir=str(tmp_path), stage="e2e")
    assert (apple.recipe, apple.retrieval_weight, apple.mse_weight, apple.channel_rows) == ("apple", 0.0, 0.1, 0.0)
    instruct = ClaraTrainingArguments(output_dir=str(tmp_path), stage="instruct", recipe="small")
    # The contrast, not a frozen compressor, keeps the memories distinct in the small recipe's instruct stage.
    assert (instruct.freeze_compressor, instruct.mse_weight, instruct.learning_rate, instruct.memory_contrast_weight,
            instruct.memory_cosine_weight, instruct.lr_scheduler_type) == (False, 0.0, 2e-4, 1.0, 50.0, "warmup_stable_decay")
    apple_instruct = ClaraTrainingArguments(output_dir=str(tmp_path), stage="instruct")
    assert (apple_instruct.memory_contrast_weight, apple_instruct.memory_cosine_weight) == (0.0, 0.0)
    frozen = ClaraTrainingArguments(output_dir=str(tmp_path), stage="instruct", recipe="small", freeze_compressor=True)
    assert frozen.freeze_compressor is True


def test_every_recipe_value_has_a_reason_and_loads():
    assert recipe_names() == ["apple", "small"]
    for name in recipe_names():
        with open(f"{RECIPES_DIR}/{name}.json", encoding="utf-8") as f:
            recipe = json.load(f)
        assert recipe["description"]
        for settings in recipe["stages"].values():
            assert all(set(setting) == {"value", "reason"} and len(setting["reason"]) > 10 for setting in settings.values())
        assert set(load_recipe(name)) == {"pretrain", "instruct", "e2e"}


def write_recipe(path, stages: dict) -> str:
    path.write_text(json.dumps({"description": "a test recipe", "stages": stages}))
    return str(path)


def test_a_recipe_file_given_by_path_sets_what_is_not_given(tmp_path):
    path = write_recipe(tmp_path / "mine.json", {
        "stage1": {"memory_cosine_weight": {"value": 7.0, "reason": "Apple's stage names name stages too"},
                   "learning_rate": {"value": 3e-4, "reason": "a rate between Apple's and small's"}},
    })
    assert load_recipe(path) == {"pretrain": {"memory_cosine_weight": 7.0, "learning_rate": 3e-4}}
    args = ClaraTrainingArguments(output_dir=str(tmp_path), stage="pretrain", recipe=path, memory_cosine_ceiling=0.5)
    assert (args.memory_cosine_weight, args.learning_rate, args.memory_cosine_ceiling) == (7.0, 3e-4, 0.5)
    assert (args.lr_scheduler_type, args.mse_weight) == ("cosine_with_min_lr", 0.1)  # Apple's recipe lies under it
    assert args.loss_config == ClaraLossConfig(memory_cosine_weight=7.0, memory_cosine_ceiling=0.5)
    e2e = ClaraTrainingArguments(output_dir=str(tmp_path), stage="e2e", recipe=path)  # a stage it leaves out
    assert (e2e.memory_cosine_weight, e2e.learning_rate) == (0.0, 5e-6)


@pytest.mark.parametrize(
    "stages, message",
    [
        ({"pretrain": {"mse_weight": 0.0}}, "write it as"),
        ({"pretrain": {"mse_weight": {"value": 0.0, "reason": ""}}}, "write it as"),
        ({"pretrain": {"output_dir": {"value": "x", "reason": "not a recipe's"}}}, "'output_dir': not an argument"),
        ({"stage9": {}}, "stage 'stage9'"),
        ({"pretrain": {"mse_weight": {"value": -1.0, "reason": "a negative weight"}}}, "mse_weight=-1.0"),
    ],
)
def test_bad_recipe_files_are_refused_naming_the_value(tmp_path, stages, message):
    path = write_recipe(tmp_path / "bad.json", stages)
    with pytest.raises(ValueError, match=re.escape(message)):
        ClaraTrainingArguments(output_dir=str(tmp_path), stage="pretrain", recipe=path)


def test_clara_train_names_a_bad_recipe_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match=re.escape("clara train: recipe='nope' is neither a recipe of this package")):
        cli.main(["train", "--recipe", "nope", "--model", "embedded", "--data", "x.jsonl", "--output_dir", str(tmp_path)])


def test_loss_config_checks_its_values():
    assert ClaraLossConfig().to_dict() == {
        "mse_weight": 0.1, "retrieval_weight": 0.0, "memory_contrast_weight": 0.0, "memory_contrast_margin": 1.0,
        "memory_cosine_weight": 0.0, "memory_cosine_ceiling": 0.8, "topk_temperature": 0.02,
    }
    for kwargs, message in [({"retrieval_weight": -0.1}, "retrieval_weight=-0.1"),
                            ({"topk_temperature": 0.0}, "topk_temperature=0.0"),
                            ({"memory_contrast_margin": "1"}, "memory_contrast_margin='1'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ClaraLossConfig(**kwargs)


@pytest.mark.parametrize("kwargs, decay_steps", [({}, 4), ({"lr_scheduler_kwargs": {"num_decay_steps": 2}}, 2)])
def test_warmup_stable_decay_decays_over_the_last_fifth_unless_told(tiny_llama_dir, tmp_path, kwargs, decay_steps):
    args = training_args(tmp_path, "instruct", recipe="small", max_steps=20, learning_rate=1e-3, **kwargs)
    trainer = ClaraTrainer(make_tiny_clara(tiny_llama_dir), args,
                           train_dataset=load_clara_jsonl(write_jsonl(tmp_path / "i.jsonl", instruct_rows(4)), "instruct"))
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    rates = []
    for _ in range(20):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    decay_start = 20 - decay_steps  # the first decay step still has the full rate (warmup_ratio is 0 here)
    assert rates[:decay_start + 1] == [1e-3] * (decay_start + 1)
    assert all(later < earlier for earlier, later in zip(rates[decay_start:], rates[decay_start + 1:]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recipe": "large"}, "recipe='large'"),
        ({"stage": "instruct", "channel_rows": 0.5}, "pretrain stage only"),
        ({"channel_rows": -1.0}, "channel_rows=-1.0"),
        ({"memory_contrast_weight": -0.5}, "memory_contrast_weight=-0.5"),
        ({"stage": "e2e", "memory_contrast_weight": 1.0}, "pretrain and instruct stages"),
        ({"memory_contrast_weight": 1.0, "per_device_train_batch_size": 1}, "per_device_train_batch_size >= 2"),
        ({"memory_cosine_weight": -1.0}, "memory_cosine_weight=-1.0"),
        ({"memory_cosine_ceiling": 1.0}, "memory_cosine_ceiling=1.0"),
        ({"stage": "e2e", "memory_cosine_weight": 1.0}, "memory_cosine_weight is for the pretrain and instruct"),
    ],
)
def test_bad_recipe_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClaraTrainingArguments(output_dir=str(tmp_path), **kwargs)


def pretrain_dataset(docs: list[str]) -> datasets.Dataset:
    rows = {"task": ["paraphrase"] * len(docs), "questions": [[]] * len(docs), "answers": [[d] for d in docs],
            "docs": [[d] for d in docs]}
    return datasets.Dataset.from_dict(rows, features=FEATURES["pretrain"])


def test_channel_rows_are_word_lists_of_the_documents_vocabulary():
    docs = [f"Passage {i} tells of {w} and mountains, rivers, valleys, forests, meadows."
            for i, w in enumerate(["Paris", "Rome", "Berlin", "Oslo", "Lima", "Quito"])]
    mixed = with_channel_rows(pretrain_dataset(docs), rows_per_row=2.0, seed=3)
    assert len(mixed) == 18
    vocabulary = {w for d in docs for w in re.findall(r"[A-Za-z]{3,}", d)}
    channel = [row for row in mixed if row["docs"][0] not in docs]
    assert len(channel) == 12
    for row in channel:
        assert row["task"] == "paraphrase" and row["answers"] == row["docs"]  # reconstruct the list itself
        words = row["docs"][0].split()
        assert 8 <= len(words) <= 12 and set(words) <= vocabulary and len(set(words)) == len(words)
    assert [row["docs"] for row in with_channel_rows(pretrain_dataset(docs), 2.0, seed=3)] == mixed["docs"]
    assert mixed["docs"][:6] != [[d] for d in docs]  # shuffled in, not appended
    assert with_channel_rows(pretrain_dataset(docs), 0.0, seed=3)["docs"] == [[d] for d in docs]


def test_channel_rows_draw_with_replacement_from_a_small_vocabulary():
    # Rung 1's documents hold 11 distinct words: the lists repeat words rather than refuse.
    docs = [f"The code word is {w}." for w in ("apple", "river", "water", "stone", "house", "music", "paper", "light")]
    mixed = with_channel_rows(pretrain_dataset(docs), rows_per_row=1.0, seed=0)
    vocabulary = {w for d in docs for w in re.findall(r"[A-Za-z]{3,}", d)}
    channel = [row["docs"][0].split() for row in mixed if row["docs"][0] not in docs]
    assert len(vocabulary) == 11 and len(channel) == 8
    assert all(8 <= len(words) <= 12 and set(words) <= vocabulary for words in channel)
    assert any(len(set(words)) < len(words) for words in channel if len(words) == 12)  # 12 of 11 words must repeat


def test_channel_rows_need_a_vocabulary():
    with pytest.raises(ValueError, match="at least 2 distinct words"):
        with_channel_rows(pretrain_dataset(["An ox is."]), 1.0, seed=0)  # no word of 3+ letters


def test_memory_cosine_hinge_is_over_different_documents_only():
    memory = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[5, 6], [7, 8], [5, 6]])  # documents 0 and 2 are one text: their cosine 1 is no collapse
    cosine_01 = 1 / 2**0.5  # documents 0-1 and 2-1
    torch.testing.assert_close(memory_cosine_hinge(memory, ids, ceiling=0.5), torch.tensor(cosine_01 - 0.5))
    assert memory_cosine_hinge(memory, ids, ceiling=0.8) == 0
    assert memory_cosine_hinge(memory[[0, 2]], ids[[0, 2]], ceiling=0.5) is None


def test_memory_cosine_loss_is_weighted_into_the_loss_and_reaches_the_compressor(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    prepare_model_for_stage(model, training_args(tmp_path, "instruct", memory_cosine_weight=2.0,
                                                 memory_cosine_ceiling=-1.0))  # every pair pays its cosine + 1
    no_dropout(model)
    outputs = model(**batch_for(model, "instruct", instruct_rows(3), tmp_path))
    assert outputs.memory_cosine_loss > 0
    torch.testing.assert_close(outputs.loss, outputs.ce_loss + 0.1 * outputs.mse_loss + 2.0 * outputs.memory_cosine_loss)
    outputs.memory_cosine_loss.backward()
    touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("encoder_adapter" in name for name in touched)
    assert not any("decoder_adapter" in name for name in touched)  # a compressor-side term
    prepare_model_for_stage(model, training_args(tmp_path, "instruct", memory_cosine_weight=2.0, freeze_compressor=True))
    with torch.no_grad():
        frozen = model(**batch_for(model, "instruct", instruct_rows(3), tmp_path))
    torch.testing.assert_close(frozen.loss, frozen.ce_loss)  # logged, not trained, with the compressor frozen
    prepare_model_for_stage(model, training_args(tmp_path, "instruct"))
    with torch.no_grad():
        assert model(**batch_for(model, "instruct", instruct_rows(3), tmp_path)).memory_cosine_loss is None  # off by default


def test_length_curriculum_keeps_memory_tokens_and_weights(tiny_llama_dir, tmp_path):
    saved = make_tiny_clara(tiny_llama_dir, training_stage="stage1")  # doc_max_length 32, compr_rate 8: 4 memory tokens
    saved.save_pretrained(tmp_path / "short")
    longer = load_model_for_stage(str(tmp_path / "short"), training_args(tmp_path, "pretrain", doc_max_length=64,
                                                                         compr_rate=16, lora_r=4))  # lora_r unchanged
    assert (longer.config.doc_max_length, longer.config.compr_rate, longer.n_mem_tokens) == (64, 16, 4)
    assert (saved.processor.encoder_length, longer.processor.encoder_length) == (32 + 3 + 4, 64 + 3 + 4)
    saved_weights = dict(saved.named_parameters())
    for name, parameter in longer.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, saved_weights[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep doc_max_length // compr_rate"):
        load_model_for_stage(str(tmp_path / "short"), training_args(tmp_path, "pretrain", doc_max_length=64))


def test_memory_contrast_is_a_hinge_on_own_versus_the_next_examples_memory(tiny_llama_dir, tmp_path):
    """`memory_contrast_loss` = mean(relu(margin + CE(own memory) - CE(the previous row's memory))), checked against
    forwards of the same batch with the documents themselves rolled; the loss adds it with its weight."""
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    args = training_args(tmp_path, "instruct", memory_contrast_weight=0.5, memory_contrast_margin=50.0)
    prepare_model_for_stage(model, args)
    no_dropout(model)
    rows = instruct_rows(3)
    rolled = [{**row, "docs": rows[i - 1]["docs"]} for i, row in enumerate(rows)]
    (tmp_path / "own").mkdir()
    (tmp_path / "other").mkdir()
    with torch.no_grad():
        outputs = model(**batch_for(model, "instruct", rows, tmp_path))
        per_row = [model(**batch_for(model, "instruct", [row], tmp_path / "own")).ce_loss for row in rows]
        per_other = [model(**batch_for(model, "instruct", [row], tmp_path / "other")).ce_loss for row in rolled]
    expected = torch.stack([50.0 + own - other for own, other in zip(per_row, per_other)]).mean()
    torch.testing.assert_close(outputs.memory_contrast_loss, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs.loss, outputs.ce_loss + 0.1 * outputs.mse_loss + 0.5 * outputs.memory_contrast_loss)


def test_memory_contrast_is_off_by_default(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    prepare_model_for_stage(model, training_args(tmp_path, "instruct"))
    with torch.no_grad():
        outputs = model(**batch_for(model, "instruct", instruct_rows(2), tmp_path))
    assert outputs.memory_contrast_loss is None and model.loss_config.memory_contrast_weight == 0.0
