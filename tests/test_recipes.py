"""Training recipes: `--recipe small`'s defaults, random-word channel rows, reconstruction rows, spread memory rows,
the memory-cosine hinge, the MSE stop-gradient, and the length curriculum (a checkpoint goes on with longer documents
when its memory-token count stays the same)."""

import re

import datasets
import pytest
import torch

from conftest import make_tiny_clara
from modeling_clara.data import (
    FEATURES,
    RECONSTRUCTION_QUESTION,
    load_clara_jsonl,
    with_channel_rows,
    with_reconstruction_rows,
)
from modeling_clara.modeling_clara import memory_cosine_hinge
from modeling_clara.training import ClaraTrainer, ClaraTrainingArguments, load_model_for_stage, prepare_model_for_stage
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
        ({"reconstruction_rows": 0.5}, "instruct stage only"),
        ({"stage": "instruct", "reconstruction_rows": -0.5}, "reconstruction_rows=-0.5"),
        ({"memory_row_init": "zeros"}, "memory_row_init='zeros'"),
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


def test_reconstruction_rows_ask_for_a_rows_first_document():
    rows = {"question": [f"Q{i}?" for i in range(6)], "docs": [[f"first {i}", f"second {i}"] for i in range(6)],
            "answer": [f"A{i}" for i in range(6)]}
    dataset = datasets.Dataset.from_dict(rows, features=FEATURES["instruct"])
    mixed = with_reconstruction_rows(dataset, rows_per_row=0.5, seed=1)
    added = [row for row in mixed if row["question"] == RECONSTRUCTION_QUESTION]
    assert len(mixed) == 9 and len(added) == 3
    assert all(row["docs"] in rows["docs"] and row["answer"] == row["docs"][0] for row in added)
    assert sorted(row["question"] for row in mixed if row not in added) == rows["question"]  # every task row kept
    assert with_reconstruction_rows(dataset, 0.5, seed=1)["docs"] == mixed["docs"]  # seeded
    assert with_reconstruction_rows(dataset, 0.0, seed=1)["docs"] == rows["docs"]


def test_spread_memory_rows_differ_and_keep_the_vocabulary_scale(tiny_llama_dir, tmp_path):
    args = training_args(tmp_path, "pretrain", memory_row_init="spread", doc_max_length=32, compr_rate=8, lora_r=4)
    model = load_model_for_stage(str(tiny_llama_dir), args)
    embeddings = model.get_input_embeddings().weight.detach()
    memory, vocabulary = embeddings[model.processor.mem_token_ids], embeddings[: model.config.base_vocab_size]
    mean_init = load_model_for_stage(str(tiny_llama_dir), training_args(tmp_path, "pretrain", doc_max_length=32,
                                                                         compr_rate=8, lora_r=4))
    mean_rows = mean_init.get_input_embeddings().weight.detach()[mean_init.processor.mem_token_ids]
    assert torch.allclose(mean_rows, mean_rows[0].expand_as(mean_rows), atol=1e-3)  # HF's resize: one vector
    # As far apart as two vocabulary rows typically are, where the mean init puts them at one point.
    typical_distance = torch.cdist(vocabulary, vocabulary).median()
    assert torch.pdist(memory).min() > 0.5 * typical_distance
    torch.testing.assert_close(memory.std(dim=0).mean(), vocabulary.std(dim=0).mean(), rtol=0.5, atol=0)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    with pytest.raises(ValueError, match="keeps its trained memory rows"):
        load_model_for_stage(str(saved), training_args(tmp_path, "pretrain", memory_row_init="spread"))


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


def test_mse_stop_gradient_keeps_the_value_and_changes_the_gradient(tiny_llama_dir, tmp_path):
    grads, values = [], []
    for stop in (False, True):
        model = make_tiny_clara(tiny_llama_dir, training_stage="stage1")
        prepare_model_for_stage(model, training_args(tmp_path, "pretrain", mse_stop_gradient=stop))
        assert model.config.mse_stop_gradient is stop  # saved with the model
        model.eval()  # no dropout: both runs see the same states
        outputs = model(**batch_for(model, "pretrain", pretrain_rows(2), tmp_path))
        outputs.mse_loss.backward()
        values.append(outputs.mse_loss.item())
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_A.encoder" in n]))
    assert values[0] == pytest.approx(values[1])
    assert not torch.allclose(grads[0], grads[1])


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
    assert outputs.memory_contrast_loss is None and model.config.memory_contrast_weight == 0.0
