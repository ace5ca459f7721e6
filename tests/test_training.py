"""Training the three CLaRa stages with the HF Trainer: what trains, where gradients go, accumulation, checkpointing,
data parallelism, resuming after a kill, the CLI chain, and an overfit smoke test to answer F1 ~ 1.0."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from conftest import make_tiny_clara
from modeling_clara import ClaraForRAG, cli
from modeling_clara.checkpoints import SHIPPED_MODEL_DIR
from modeling_clara.cli.eval import add_model_arguments
from modeling_clara.cli.train import parse_train_args
from modeling_clara.configuration_clara import ClaraConfig, ClaraLossConfig, resolve_stage, stage_name
from modeling_clara.data import load_clara_jsonl, make_collator
from modeling_clara.modeling_clara import contrastive_retrieval_loss
from modeling_clara.metrics.clara_qa.clara_qa import score_example
from modeling_clara.processing_clara import (
    PARAPHRASE_INSTRUCTIONS,
    SYSTEM_PROMPT_ANSWER,
    SYSTEM_PROMPT_PARAPHRASE,
    SYSTEM_PROMPT_QA,
)
from modeling_clara.training import (
    TRAINING_SETTINGS_FILE,
    ClaraTrainer,
    ClaraTrainingArguments,
    load_model_for_stage,
    prepare_model_for_stage,
    train_clara,
)

REPO_DIR = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "green", "seven", "house", "light", "ocean", "bread",
         "chair", "dream", "eagle", "flame", "grape", "horse", "ivory", "juice", "knife", "lemon", "maple", "night"]
ENCODER, QUERY, DECODER = "encoder_adapter", "query_reasoner_adapter", "decoder_adapter"


def document(i: int) -> str:
    return f"Item {i} has the code word {WORDS[i]}."


def pretrain_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"data_type": "qa", "question": [f"What is the code word of item {i}?", f"Which item has {WORDS[i]}?"],
                     "answers": [WORDS[i], f"item {i}"], "docs": [document(i)]})
        rows.append({"data_type": "paraphrase", "question": "", "answers": [f"The code word {WORDS[i]} is item {i}'s."],
                     "docs": [document(i)]})
    return rows


def instruct_rows(n: int) -> list[dict]:
    return [{"question": f"What is the code word of item {i}?", "docs": [document(i), document((i + 5) % len(WORDS))],
             "answer": WORDS[i]} for i in range(n)]


def e2e_rows(n: int, n_candidates: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        candidates = [(i + 7 * j) % len(WORDS) for j in range(n_candidates)]
        candidates = candidates[i % n_candidates:] + candidates[: i % n_candidates]  # gold at varying positions
        rows.append({"question": f"What is the code word of item {i}?", "docs": [document(c) for c in candidates],
                     "gold_answer": WORDS[i], "pos_index": [candidates.index(i)], "answers": [WORDS[i]]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("clara_training_data")
    return {
        "pretrain": write_jsonl(folder / "pretrain.jsonl", pretrain_rows(4)),
        "instruct": write_jsonl(folder / "instruct.jsonl", instruct_rows(8)),
        "e2e": write_jsonl(folder / "e2e.jsonl", e2e_rows(8, n_candidates=5)),
    }


def training_args(tmp_path, stage: str, **overrides) -> ClaraTrainingArguments:
    values = dict(output_dir=str(tmp_path / f"run_{stage}"), stage=stage, per_device_train_batch_size=2, max_steps=3,
                  save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False,
                  generation_top_k=2, learning_rate=1e-2, warmup_ratio=0.0, seed=0)
    return ClaraTrainingArguments(**{**values, **overrides})


def batch_for(model, stage: str, rows: list[dict], tmp_path) -> dict:
    dataset = load_clara_jsonl(write_jsonl(tmp_path / f"{stage}_batch.jsonl", rows), stage)
    collator = make_collator(stage, model.processor, top_k=model.config.generation_top_k, paraphrase_instruction=0) \
        if stage == "pretrain" else make_collator(stage, model.processor, top_k=model.config.generation_top_k)
    return collator([dataset[i] for i in range(len(dataset))])


def adapter_of(name: str) -> str | None:
    for adapter in (ENCODER, QUERY, DECODER):
        if f".{adapter}." in name:
            return adapter
    return None


def no_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ------------------------------------------------------------------------------------------------------------------
# Arguments and stage setup


def test_stage_defaults_follow_apple_scripts(tmp_path):
    pretrain = ClaraTrainingArguments(output_dir=str(tmp_path), stage="pretrain")
    assert pretrain.learning_rate == 1e-4 and pretrain.lr_scheduler_type == "cosine_with_min_lr"
    assert pretrain.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and pretrain.decoder_max_length == 2048
    assert (pretrain.adam_beta2, pretrain.warmup_ratio, pretrain.weight_decay, pretrain.mse_weight) == (0.95, 0.03, 0.0, 0.1)
    e2e = ClaraTrainingArguments(output_dir=str(tmp_path), stage="e2e")
    assert (e2e.learning_rate, e2e.lr_scheduler_type, e2e.decoder_max_length, e2e.topk_temperature) == (5e-6, "constant", 1024, 0.02)
    assert ClaraTrainingArguments(output_dir=str(tmp_path), stage="e2e", learning_rate=1e-3).learning_rate == 1e-3
    with pytest.raises(ValueError, match="stage='stage1'"):
        ClaraTrainingArguments(output_dir=str(tmp_path), stage="stage1")
    with pytest.raises(ValueError, match="query_reasoner_init='random'"):
        ClaraTrainingArguments(output_dir=str(tmp_path), query_reasoner_init="random")


@pytest.mark.parametrize(
    "stage, trained",
    [("pretrain", {ENCODER, DECODER}), ("instruct", {ENCODER, DECODER}), ("e2e", {QUERY, DECODER})],
)
def test_exactly_the_stage_parameters_train_and_reach_the_optimizer(tiny_llama_dir, tmp_path, stage, trained):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "saved")  # all three adapters
    args = training_args(tmp_path, stage, weight_decay=0.1)
    trainer = ClaraTrainer(load_model_for_stage(str(tmp_path / "saved"), args), args)
    model = trainer.model
    assert model.config.training_stage == {"pretrain": "stage1", "instruct": "stage1_2", "e2e": "stage2"}[stage]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {adapter_of(name) for name in trainable if adapter_of(name)} == trained
    embedding = "decoder.model.embed_tokens.weight"
    assert (embedding in trainable) == (ENCODER in trained)  # memory rows train with the compressor only
    assert all(adapter_of(name) or name == embedding for name in trainable)  # the backbone stays frozen
    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(model.get_input_embeddings().weight) not in decayed and decayed  # AdamW decay would move frozen rows


@pytest.mark.parametrize("init", ["encoder", "fresh"])
def test_e2e_from_a_checkpoint_without_query_reasoner(tiny_llama_dir, tmp_path, init):
    make_tiny_clara(tiny_llama_dir, training_stage="stage1_2").save_pretrained(tmp_path / "instruct")
    args = training_args(tmp_path, "e2e", query_reasoner_init=init)
    model = load_model_for_stage(str(tmp_path / "instruct"), args)
    assert not model.has_query_reasoner
    prepare_model_for_stage(model, args)
    weights = {name: p for name, p in model.decoder.named_parameters() if "lora_" in name}
    query = {name: p for name, p in weights.items() if adapter_of(name) == QUERY}
    assert query
    for name, parameter in query.items():
        encoder = weights[name.replace(QUERY, ENCODER)]
        if init == "encoder":
            assert torch.equal(parameter, encoder)
        elif "lora_B" in name:
            assert not parameter.any()  # a fresh LoRA starts as the identity
    assert {adapter_of(n) for n, p in model.named_parameters() if p.requires_grad and adapter_of(n)} == {QUERY, DECODER}


def test_apple_stage_names_are_aliases_of_ours():
    assert [stage_name(name) for name in ("stage1", "stage1_2", "stage2")] == ["pretrain", "instruct", "e2e"]
    assert [stage_name(name) for name in ("pretrain", "instruct", "e2e")] == ["pretrain", "instruct", "e2e"]
    assert resolve_stage("instruct") is resolve_stage("stage1_2")
    assert resolve_stage("stage2_reasoning").training_stage == "stage2_reasoning"
    with pytest.raises(ValueError, match="'stage2_reasoning' is not trained here"):
        stage_name("stage2_reasoning")
    with pytest.raises(ValueError, match="stage 'stage9' is not one of"):
        stage_name("stage9")
    argv = ["--model", "embedded", "--data", "x.jsonl", "--output_dir", "out"]
    assert parse_train_args(["--stage", "stage1_2", *argv])[1].stage == "instruct"
    with pytest.raises(SystemExit):
        parse_train_args(["--stage", "stage9", *argv])
    eval_parser = argparse.ArgumentParser()
    add_model_arguments(eval_parser)
    assert eval_parser.parse_args(["--model", "embedded", "--data", "x.jsonl", "--stage", "stage2"]).stage == "e2e"
    assert eval_parser.parse_args(["--model", "embedded", "--data", "x.jsonl"]).stage == "instruct"


def test_a_bad_training_stage_is_a_clear_error_and_overrides_are_checked():
    with pytest.raises(ValueError, match=r"training_stage='instruct' is not one of Apple's stages.*'stage1_2'"):
        ClaraConfig(training_stage="instruct")
    config = ClaraConfig(doc_max_length=64, compr_rate=4)
    config.update({"compr_rate": 8, "generation_top_k": 2})
    assert (config.compr_rate, config.generation_top_k, config.n_mem_tokens) == (8, 2, 8)
    for overrides, message in [({"training_stage": "stage3"}, "training_stage='stage3'"),
                               ({"compr_rate": 128}, "compr_rate=128 leaves no memory token"),
                               ({"lora_r": 4, "generation_top_k": 0}, "generation_top_k=0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            config.update(overrides)
        unchanged = (config.training_stage, config.compr_rate, config.generation_top_k, config.lora_r)
        assert unchanged == ("stage1_2", 8, 2, 16)


def test_the_shipped_config_holds_no_training_knob():
    shipped = json.loads((Path(SHIPPED_MODEL_DIR) / "config.json").read_text())
    training_knobs = {f.name for f in dataclasses.fields(ClaraLossConfig)} | {"mse_stop_gradient", "memory_projection"}
    assert not training_knobs & shipped.keys()
    assert {"doc_max_length", "compr_rate", "generation_top_k", "lora_r", "training_stage"} <= shipped.keys()


def test_run_settings_in_an_older_config_are_dropped_on_load(tmp_path):
    """config.json files written by clara-hf 0.1.0 carry the loss weights of the stage that saved them: they load,
    and the weights are not read or written back (a run's weights are in its training_settings.json)."""
    run_settings = {"mse_weight": 0.1, "mse_stop_gradient": False, "retrieval_weight": 1.0, "topk_temperature": 0.02,
                    "memory_contrast_weight": 0.0, "memory_contrast_margin": 1.0, "memory_projection": None}
    (tmp_path / "config.json").write_text(json.dumps({**ClaraConfig(lora_r=8).to_dict(), **run_settings}))
    config = ClaraConfig.from_pretrained(tmp_path)
    assert config.lora_r == 8 and not any(hasattr(config, name) for name in run_settings)
    config.save_pretrained(tmp_path / "saved")
    assert not run_settings.keys() & json.loads((tmp_path / "saved" / "config.json").read_text()).keys()
    (tmp_path / "config.json").write_text(json.dumps({**ClaraConfig().to_dict(), "memory_projection": "token_norm"}))
    with pytest.raises(ValueError, match="memory_projection"):
        ClaraConfig.from_pretrained(tmp_path)


def test_from_pretrained_overrides_are_checked(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=re.escape("training_stage='instruct' is not one of Apple's stages")):
        ClaraForRAG.from_pretrained(str(tmp_path / "saved"), training_stage="instruct")
    with pytest.raises(ValueError, match="generation_top_k=0"):
        ClaraForRAG.from_pretrained(str(tmp_path / "saved"), generation_top_k=0)
    with pytest.raises(TypeError, match="mse_weight"):  # a run setting: ClaraTrainingArguments takes it
        ClaraForRAG.from_pretrained(str(tmp_path / "saved"), mse_weight=0.5)


def test_the_trainer_hands_the_loss_weights_to_the_model_not_its_config(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    assert model.loss_config == ClaraLossConfig()  # Apple's objective until a run sets its own
    prepare_model_for_stage(model, training_args(tmp_path, "instruct", mse_weight=0.3, memory_cosine_weight=2.0))
    assert model.loss_config == ClaraLossConfig(mse_weight=0.3, memory_cosine_weight=2.0)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not {f.name for f in dataclasses.fields(ClaraLossConfig)} & saved.keys()


def test_checkpoint_architecture_cannot_be_overridden(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"doc_max_length.*\(64, 32\)"):
        load_model_for_stage(str(tmp_path / "saved"), training_args(tmp_path, "instruct", doc_max_length=64))


# ------------------------------------------------------------------------------------------------------------------
# Gradients


def test_answer_loss_reaches_the_query_reasoner_through_topk(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir)
    prepare_model_for_stage(model, training_args(tmp_path, "e2e"))
    model.train()
    outputs = model(**batch_for(model, "e2e", e2e_rows(2, n_candidates=4), tmp_path))
    outputs.ce_loss.backward()

    grads = {name: p.grad for name, p in model.named_parameters()}
    # The candidates are compressed without gradients, so the query reasoner's only path is scores -> top-k.
    for adapter in (QUERY, DECODER):
        adapter_grads = [g for n, g in grads.items() if adapter_of(n) == adapter]
        assert adapter_grads and all(g is not None for g in adapter_grads), adapter
        assert sum(g.abs().sum() for g in adapter_grads) > 0, adapter
    assert all(g is None for n, g in grads.items() if adapter_of(n) not in (QUERY, DECODER))  # encoder, embeddings
    assert outputs.mse_loss is not None and not outputs.mse_loss.requires_grad  # logged only in e2e


def test_mse_reaches_the_encoder_adapter_and_memory_rows_only(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1")
    prepare_model_for_stage(model, training_args(tmp_path, "pretrain"))
    model.train()
    outputs = model(**batch_for(model, "pretrain", pretrain_rows(1), tmp_path))
    outputs.mse_loss.backward()

    grads = {name: p.grad for name, p in model.named_parameters()}
    encoder = [g for n, g in grads.items() if adapter_of(n) == ENCODER]
    assert all(g is not None for g in encoder) and sum(g.abs().sum() for g in encoder) > 0
    assert all(g is None or not g.any() for n, g in grads.items() if adapter_of(n) in (DECODER, QUERY))
    embedding_grad = model.get_input_embeddings().weight.grad
    rows = set(embedding_grad.abs().sum(-1).nonzero().flatten().tolist())
    assert rows and rows <= set(model.processor.mem_token_ids)
    assert all(g is None for n, g in grads.items() if not adapter_of(n) and "embed_tokens" not in n)


def test_answer_loss_reaches_encoder_and_decoder_in_compression_stages(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    prepare_model_for_stage(model, training_args(tmp_path, "instruct"))
    model(**batch_for(model, "instruct", instruct_rows(2), tmp_path)).ce_loss.backward()
    for adapter in (ENCODER, DECODER):
        assert sum(p.grad.abs().sum() for n, p in model.named_parameters() if adapter_of(n) == adapter) > 0


def test_straight_through_forward_equals_hard_topk(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir)
    prepare_model_for_stage(model, training_args(tmp_path, "e2e"))
    model.eval()  # no dropout; gradients still flow
    batch = batch_for(model, "e2e", e2e_rows(3, n_candidates=4), tmp_path)
    outputs = model(**batch)
    assert torch.equal(outputs.topk_indices, outputs.retrieval_scores.topk(2).indices)

    with torch.no_grad():
        candidates = model._encode_documents(batch["enc_input_ids"], batch["enc_attention_mask"])[0]
        candidates = candidates.view(3, 4, *candidates.shape[1:])
        hard = candidates[torch.arange(3)[:, None], outputs.topk_indices]  # (batch, k, n_mem, hidden)
        inputs_embeds = model._replace_memory_embeddings(batch["dec_input_ids"], hard.flatten(0, 1), [2, 2, 2])
        with model.adapter(DECODER):
            logits = model.decoder(inputs_embeds=inputs_embeds, attention_mask=batch["dec_attention_mask"]).logits
    torch.testing.assert_close(outputs.logits, logits, rtol=0, atol=0)


def test_cached_candidate_memory_gives_the_forward_of_compressing_each_batch(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir)
    args = training_args(tmp_path, "e2e", cache_candidate_memory=True)
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "e2e.jsonl", e2e_rows(3, n_candidates=4)), "e2e")
    trainer = ClaraTrainer(model, args, train_dataset=dataset)
    cache = trainer.data_collator.candidate_memory
    assert sorted(cache) == sorted({doc for docs in dataset["docs"] for doc in docs})  # each distinct text once
    model.eval()  # the cache is computed without dropout; compare with the per-batch path without it too
    rows = [dataset[i] for i in range(len(dataset))]
    cached_batch = trainer.data_collator(rows)
    assert "enc_input_ids" not in cached_batch and cached_batch["candidate_embeds"].shape[:2] == (3, 4)
    with torch.no_grad():
        cached = model(**cached_batch)
        compressed = model(**batch_for(model, "e2e", e2e_rows(3, n_candidates=4), tmp_path))
    torch.testing.assert_close(cached.retrieval_scores, compressed.retrieval_scores)
    torch.testing.assert_close(cached.ce_loss, compressed.ce_loss)
    assert torch.equal(cached.topk_indices, compressed.topk_indices)
    with pytest.raises(ValueError, match="no cached memory"):
        trainer.data_collator([{**rows[0], "docs": ["A text that was never compressed."] * 4}])


def test_cache_candidate_memory_trains_the_query_reasoner(tiny_llama_dir, tmp_path, data_files):
    model = make_tiny_clara(tiny_llama_dir)
    args = training_args(tmp_path, "e2e", cache_candidate_memory=True, freeze_generator=True, n_candidates=4,
                         retrieval_weight=1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ClaraTrainer(model, args, train_dataset=load_clara_jsonl(data_files["e2e"], "e2e", n_candidates=4))
    trainer.train()
    changed = {adapter_of(n) for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {QUERY}
    assert any("retrieval_loss" in entry for entry in trainer.state.log_history)


def test_retrieval_only_trains_the_query_reasoner_on_the_retrieval_loss(tiny_llama_dir, tmp_path, data_files):
    model = make_tiny_clara(tiny_llama_dir)
    args = training_args(tmp_path, "e2e", retrieval_only=True, retrieval_weight=1.0, n_candidates=4)
    assert args.freeze_generator
    dataset = load_clara_jsonl(data_files["e2e"], "e2e", n_candidates=4)
    trainer = ClaraTrainer(model, args, train_dataset=dataset)
    batch = trainer.data_collator([dataset[i] for i in range(2)])
    assert "dec_input_ids" not in batch and "labels" not in batch
    model.eval()
    outputs = model(**batch)
    expected = contrastive_retrieval_loss(outputs.retrieval_scores, batch["positive_mask"], model.loss_config.topk_temperature)
    torch.testing.assert_close(outputs.loss, expected)
    assert outputs.ce_loss is None and outputs.logits is None
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {adapter_of(n) for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {QUERY}
    losses = [entry["retrieval_loss"] for entry in trainer.state.log_history if "retrieval_loss" in entry]
    assert losses and all("ce_loss" not in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="give positive_mask"):
        model(query_input_ids=batch["query_input_ids"], query_attention_mask=batch["query_attention_mask"],
              enc_input_ids=batch["enc_input_ids"], enc_attention_mask=batch["enc_attention_mask"])


def test_in_batch_negatives_rank_every_candidate_of_the_batch(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir)
    rows = e2e_rows(3, n_candidates=4)
    rows.append({**rows[0], "question": "Which code word does item 0 have?"})  # shares its gold with row 0
    args = training_args(tmp_path, "e2e", retrieval_only=True, retrieval_weight=1.0, cache_candidate_memory=True,
                         in_batch_negatives=True, max_steps=2)
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "e2e.jsonl", rows), "e2e")
    trainer = ClaraTrainer(model, args, train_dataset=dataset)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    texts = list(dict.fromkeys(doc for row in rows for doc in row["docs"]))
    assert batch["candidate_embeds"].shape[:2] == (4, len(texts)) and len(texts) > 4
    for i, row in enumerate(rows):
        gold = row["docs"][row["pos_index"][0]]
        assert batch["positive_mask"][i].tolist() == [text == gold for text in texts]
    assert batch["positive_mask"][0].equal(batch["positive_mask"][3])
    torch.testing.assert_close(batch["candidate_embeds"][2, texts.index(rows[2]["docs"][1])],
                               trainer.data_collator.candidate_memory[rows[2]["docs"][1]])
    trainer.train()
    assert any("retrieval_loss" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="in_batch_negatives needs"):
        training_args(tmp_path, "e2e", retrieval_only=True, retrieval_weight=1.0, in_batch_negatives=True)


@pytest.mark.parametrize("overrides", [{"retrieval_weight": 0.0}, {"stage": "instruct", "retrieval_weight": 1.0}])
def test_retrieval_only_needs_e2e_and_a_retrieval_weight(tmp_path, overrides):
    with pytest.raises(ValueError, match="retrieval_only trains on the retrieval loss"):
        training_args(tmp_path, overrides.pop("stage", "e2e"), retrieval_only=True, **overrides)


def test_cache_candidate_memory_is_for_e2e_only(tmp_path):
    with pytest.raises(ValueError, match="cache_candidate_memory is for the e2e stage"):
        training_args(tmp_path, "instruct", cache_candidate_memory=True)


# ------------------------------------------------------------------------------------------------------------------
# What an optimizer step changes


@pytest.mark.parametrize("stage", ["pretrain", "e2e"])
def test_frozen_parameters_stay_bit_identical_through_training(tiny_llama_dir, tmp_path, data_files, stage):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1" if stage == "pretrain" else "stage2")
    args = training_args(tmp_path, stage, weight_decay=0.1, n_candidates=4 if stage == "e2e" else None)
    dataset = load_clara_jsonl(data_files[stage], stage, n_candidates=args.n_candidates)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ClaraTrainer(model, args, train_dataset=dataset).train()
    after = dict(model.named_parameters())

    trained = {ENCODER, DECODER} if stage == "pretrain" else {QUERY, DECODER}
    for name, old in before.items():
        new = after[name].detach()
        if adapter_of(name) in trained and "lora_B" in name:
            assert not torch.equal(old, new), name
        elif "embed_tokens" not in name and adapter_of(name) not in trained:
            assert torch.equal(old, new), name  # backbone and frozen adapters (e2e: the encoder adapter)
    embedding = "decoder.model.embed_tokens.weight"
    memory = torch.zeros(len(before[embedding]), dtype=torch.bool)
    memory[model.processor.mem_token_ids] = True
    assert torch.equal(before[embedding][~memory], after[embedding].detach()[~memory])  # weight decay 0.1 notwithstanding
    assert torch.equal(before[embedding][memory], after[embedding].detach()[memory]) == (stage == "e2e")


def test_memory_rows_stay_frozen_without_optimize_mem_tokens(tiny_llama_dir, tmp_path, data_files):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1")
    args = training_args(tmp_path, "pretrain", optimize_mem_tokens=False, max_steps=1)
    before = model.get_input_embeddings().weight.detach().clone()
    ClaraTrainer(model, args, train_dataset=load_clara_jsonl(data_files["pretrain"], "pretrain")).train()
    assert not model.get_input_embeddings().weight.requires_grad
    assert torch.equal(before, model.get_input_embeddings().weight)


@pytest.mark.parametrize(
    "stage, freeze, trained",
    [
        ("pretrain", "freeze_compressor", {DECODER}),  # neither the encoder adapter nor the memory rows moved
        ("instruct", "freeze_compressor", {DECODER}),
        ("pretrain", "freeze_generator", {ENCODER, None}),  # None: the memory rows
        ("e2e", "freeze_generator", {QUERY}),
    ],
)
def test_freezing_one_side_trains_the_rest_only(tiny_llama_dir, tmp_path, data_files, stage, freeze, trained):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage2" if stage == "e2e" else "stage1")
    args = training_args(tmp_path, stage, max_steps=2, n_candidates=4 if stage == "e2e" else None, **{freeze: True})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = load_clara_jsonl(data_files[stage], stage, n_candidates=args.n_candidates)
    ClaraTrainer(model, args, train_dataset=dataset).train()
    after = dict(model.named_parameters())
    changed = {adapter_of(name) for name, old in before.items() if not torch.equal(old, after[name].detach())}
    assert changed == trained


@pytest.mark.parametrize("freeze, with_mse", [(None, True), ("freeze_compressor", False)])
def test_the_trainer_minimises_the_models_loss(tiny_llama_dir, tmp_path, freeze, with_mse):
    """One owner of the loss: `compute_loss` returns `outputs.loss`, whose MSE term is there only while the compressor
    trains (a frozen compressor's MSE is logged, not added)."""
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1")
    trainer = ClaraTrainer(model, training_args(tmp_path, "pretrain", **({freeze: True} if freeze else {})))
    loss, outputs = trainer.compute_loss(model, batch_for(model, "pretrain", pretrain_rows(1), tmp_path), return_outputs=True)
    assert loss is outputs.loss and outputs.mse_loss is not None
    torch.testing.assert_close(loss, outputs.ce_loss + 0.1 * outputs.mse_loss if with_mse else outputs.ce_loss)


def test_freeze_compressor_is_refused_in_e2e(tmp_path):
    with pytest.raises(ValueError, match="freeze_compressor"):
        training_args(tmp_path, "e2e", freeze_compressor=True)


def test_freezing_compressor_and_generator_together_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        training_args(tmp_path, "pretrain", freeze_compressor=True, freeze_generator=True)


class GradientRecorder(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_averages_micro_batches(tiny_llama_dir, tmp_path, data_files):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    args = training_args(tmp_path, "instruct", per_device_train_batch_size=1, gradient_accumulation_steps=2,
                         max_steps=1, max_grad_norm=0.0)
    prepare_model_for_stage(model, args)
    no_dropout(model)
    rows = instruct_rows(2)
    model.train()
    for row in rows:  # the expected gradient: the mean of the two micro-batch losses
        outputs = model(**batch_for(model, "instruct", [row], tmp_path))
        ((outputs.ce_loss + 0.1 * outputs.mse_loss) / 2).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    recorder = GradientRecorder(model)
    dataset = load_clara_jsonl(write_jsonl(tmp_path / "two.jsonl", rows), "instruct")
    ClaraTrainer(model, args, train_dataset=dataset, callbacks=[recorder]).train()
    assert recorder.grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(recorder.grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["pretrain", "e2e"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, tmp_path, data_files, stage):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1" if stage == "pretrain" else "stage2")
    prepare_model_for_stage(model, training_args(tmp_path, stage))
    no_dropout(model)
    model.train()
    batch = batch_for(model, stage, pretrain_rows(1) if stage == "pretrain" else e2e_rows(2), tmp_path)

    def gradients():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and {adapter_of(n) for n in plain} >= {DECODER}
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)

    # And through the Trainer's flag.
    fresh = make_tiny_clara(tiny_llama_dir, training_stage="stage1")
    args = training_args(tmp_path, "pretrain", gradient_checkpointing=True, max_steps=1)
    ClaraTrainer(fresh, args, train_dataset=load_clara_jsonl(data_files["pretrain"], "pretrain")).train()
    assert fresh.is_gradient_checkpointing


# ------------------------------------------------------------------------------------------------------------------
# CLI, data parallelism, resuming


def run_cli(argv: list[str]) -> None:
    assert cli.main(["train", *argv]) == 0


def log_history(output_dir) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def test_three_stages_chain_from_the_cli(tiny_llama_dir, tmp_path, data_files, capsys):
    common = ["--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
              "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--learning_rate", "1e-2"]
    stage1, stage2, stage3 = (tmp_path / name for name in ("stage1", "stage2", "stage3"))
    run_cli(["--stage", "pretrain", "--model", str(tiny_llama_dir), "--data", data_files["pretrain"],
             "--output-dir", str(stage1), "--doc_max_length", "32", "--compr_rate", "8", "--lora_r", "4",
             "--eval_holdout", "2", *common])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["global_step"] == 2
    run_cli(["--stage", "instruct", "--model", str(stage1), "--data", data_files["instruct"],
             "--output_dir", str(stage2), "--generation_top_k", "2", *common])
    run_cli(["--stage", "e2e", "--model", str(stage2), "--data", data_files["e2e"], "--output_dir", str(stage3),
             "--n_candidates", "4", "--generation_top_k", "2", "--retrieval_weight", "0.5", *common])

    configs = [json.loads((stage / "config.json").read_text()) for stage in (stage1, stage2, stage3)]
    assert [c["training_stage"] for c in configs] == ["stage1", "stage1_2", "stage2"]
    settings = [json.loads((stage / TRAINING_SETTINGS_FILE).read_text()) for stage in (stage1, stage2, stage3)]
    assert [s["stage"] for s in settings] == ["pretrain", "instruct", "e2e"]
    assert settings[2]["loss"] == {**ClaraLossConfig().to_dict(), "retrieval_weight": 0.5}  # the run's, given
    assert settings[0]["recipe"] == "apple" and settings[0]["learning_rate"] == 1e-2
    assert configs[2]["generation_top_k"] == 2 and "retrieval_weight" not in configs[2]
    first = log_history(stage1)
    assert {"ce_loss", "mse_loss"} <= first[0].keys() and "eval_ce_loss" in first[-1]
    assert {"ce_loss", "mse_loss", "retrieval_loss", "retrieval_recall"} <= log_history(stage3)[0].keys()
    weights = [load_file(stage / "model.safetensors") for stage in (stage1, stage2, stage3)]
    encoder = [{k: v for k, v in w.items() if k.startswith(ENCODER)} for w in weights]
    assert not all(torch.equal(encoder[0][k], encoder[1][k]) for k in encoder[0])  # stage 2 trains the compressor
    assert all(torch.equal(encoder[1][k], encoder[2][k]) for k in encoder[1])  # stage 3 leaves it untouched
    assert torch.equal(weights[1]["added_tokens.input_embeddings"], weights[2]["added_tokens.input_embeddings"])
    query = {k.replace(QUERY, ENCODER): v for k, v in weights[2].items() if k.startswith(QUERY)}
    assert query.keys() == encoder[1].keys()  # initialised from the encoder, then trained
    assert not all(torch.equal(query[k], encoder[1][k]) for k in query)
    assert ClaraForRAG.from_pretrained(str(stage3)).has_query_reasoner


def test_the_seed_decides_the_initial_adapters(tiny_llama_dir, tmp_path, data_files):
    """A fresh model's LoRA draws from torch's generator before the Trainer seeds it: `--seed` must cover that draw."""
    def trained(seed: int, name: str, generator_state: int) -> dict:
        argv = ["--stage", "pretrain", "--model", str(tiny_llama_dir), "--data", data_files["pretrain"],
                "--output_dir", str(tmp_path / name), "--doc_max_length", "32", "--compr_rate", "8", "--lora_r", "4",
                "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", str(seed)]
        torch.manual_seed(generator_state)  # whatever the generator held before: a fresh process's is random
        train_clara(*parse_train_args(argv))
        return load_file(tmp_path / name / "model.safetensors")

    first, again, other = trained(0, "first", 1), trained(0, "again", 2), trained(1, "other", 1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback
    from modeling_clara.cli.train import parse_train_args
    from modeling_clara.training import train_clara

    class KillAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a crash or a preempted job

    train_clara(*parse_train_args(sys.argv[1:]), callbacks=[KillAtStep()])
    """
)


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR)}


@pytest.mark.slow
def test_resume_after_a_kill_loses_no_step(tiny_llama_dir, tmp_path, data_files):
    make_tiny_clara(tiny_llama_dir, training_stage="stage1_2").save_pretrained(tmp_path / "start")
    argv = ["--stage", "instruct", "--model", str(tmp_path / "start"), "--data", data_files["instruct"],
            "--per_device_train_batch_size", "2", "--max_steps", "8", "--save_steps", "3", "--logging_steps", "1",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--learning_rate", "1e-2"]
    killed = tmp_path / "killed"
    process = subprocess.run([sys.executable, "-c", KILLED_RUN, *argv, "--output_dir", str(killed)],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3"]

    run_cli([*argv, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    reference = tmp_path / "reference"
    run_cli([*argv, "--output_dir", str(reference)])

    resumed_losses = {e["step"]: e["loss"] for e in log_history(killed) if "loss" in e}
    reference_losses = {e["step"]: e["loss"] for e in log_history(reference) if "loss" in e}
    assert sorted(resumed_losses) == list(range(1, 9))  # steps 1-3 from the checkpoint, 4-8 after resuming
    assert resumed_losses == pytest.approx(reference_losses, abs=1e-4)  # same data order, same updates
    assert json.loads((killed / "trainer_state.json").read_text())["global_step"] == 8
    resumed, uninterrupted = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_llama_dir, tmp_path, data_files):
    make_tiny_clara(tiny_llama_dir, training_stage="stage1_2").save_pretrained(tmp_path / "start")
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "modeling_clara.cli", "train", "--stage", "instruct", "--model", str(tmp_path / "start"),
               "--data", data_files["instruct"], "--output_dir", str(output), "--per_device_train_batch_size", "2",
               "--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
               "--dataloader_pin_memory", "false"]
    process = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO_DIR)
    assert process.returncode == 0, process.stderr[-3000:]
    # 8 rows, 2 per process and step, 2 processes (gloo): 2 steps, where one process alone would take 4.
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert ClaraForRAG.from_pretrained(str(output)).config.training_stage == "stage1_2"


@pytest.mark.slow
@pytest.mark.integration
def test_cli_on_the_embedded_backbone(tmp_path, data_files, embedded_backbone_dir):
    run_cli(["--stage", "pretrain", "--model", "embedded", "--data", data_files["pretrain"], "--output_dir",
             str(tmp_path / "embedded"), "--doc_max_length", "32", "--max_steps", "1", "--per_device_train_batch_size",
             "1", "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"])
    config = json.loads((tmp_path / "embedded" / "config.json").read_text())
    assert config["decoder_model_name"] == "embedded" and config["training_stage"] == "stage1"


# ------------------------------------------------------------------------------------------------------------------
# Overfit smoke test


def word_level_backbone(path: Path, texts: list[str]) -> Path:
    """A tiny Llama with a word-level tokenizer over `texts` and the SmolLM2 chat template: a vocabulary of ~200
    instead of 49k makes many steps cheap, and embeddings at std 0.3 let logits grow enough to fit."""
    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"])}
    for text in texts + [SYSTEM_PROMPT_ANSWER, SYSTEM_PROMPT_QA, SYSTEM_PROMPT_PARAPHRASE, *PARAPHRASE_INSTRUCTIONS,
                         "system user assistant Background: Question:"]:
        for piece, _ in pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
        "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = LlamaConfig(hidden_size=64, intermediate_size=133, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         initializer_range=0.3, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def answer_f1(prediction: str, answers: list[str]) -> float:
    return score_example(prediction, answers)["f1"]


@pytest.mark.slow
def test_overfit_instruct_to_answer_f1_one_and_save_load_keeps_eval_loss(tmp_path):
    rows = instruct_rows(len(WORDS))
    backbone = word_level_backbone(tmp_path / "word_llama", [json.dumps(row) for row in rows])
    data = write_jsonl(tmp_path / "overfit.jsonl", rows)
    args = training_args(tmp_path, "instruct", per_device_train_batch_size=8, max_steps=120, learning_rate=3e-3,
                         lr_scheduler_type="constant", logging_steps=20)
    torch.manual_seed(0)
    model = ClaraForRAG.from_backbone(str(backbone), training_stage="stage1_2", doc_max_length=16, compr_rate=4, lora_r=8)
    dataset = load_clara_jsonl(data, "instruct")
    trainer = ClaraTrainer(model, args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    metrics = trainer.evaluate()
    eval_loss = metrics["eval_loss"]

    model.eval()
    predictions = model.answer([row["question"] for row in rows], [model.compress(row["docs"]) for row in rows],
                               max_new_tokens=4)
    f1 = sum(answer_f1(p, [row["answer"]]) for p, row in zip(predictions, rows)) / len(rows)
    assert f1 >= 0.95, list(zip(predictions, [row["answer"] for row in rows]))
    assert metrics["eval_ce_loss"] < 0.3 and eval_loss == pytest.approx(metrics["eval_ce_loss"] + 0.1 * metrics["eval_mse_loss"], rel=1e-3)

    model.save_pretrained(tmp_path / "overfit")
    loaded = ClaraForRAG.from_pretrained(str(tmp_path / "overfit"))
    reloaded_args = training_args(tmp_path, "instruct", output_dir=str(tmp_path / "reloaded"))
    reloaded_loss = ClaraTrainer(loaded, reloaded_args, eval_dataset=dataset).evaluate()["eval_loss"]
    assert reloaded_loss == pytest.approx(eval_loss, abs=1e-5)


@pytest.mark.slow
def test_overfit_to_answers_only_the_compressed_document_holds(tmp_path):
    """One question for every row; the answer is only in the document. Fitting it proves the answer loss trains the
    compressor and the decoder to pass content through the memory tokens (not to map questions to answers)."""
    rows = [{"question": "What is the code word?", "docs": [document(i)], "answer": WORDS[i]} for i in range(12)]
    backbone = word_level_backbone(tmp_path / "word_llama", [json.dumps(row) for row in rows])
    data = write_jsonl(tmp_path / "memory_only.jsonl", rows)
    args = training_args(tmp_path, "instruct", per_device_train_batch_size=6, max_steps=200, learning_rate=3e-3,
                         lr_scheduler_type="constant", logging_steps=50)
    torch.manual_seed(0)
    model = ClaraForRAG.from_backbone(str(backbone), training_stage="stage1_2", doc_max_length=16, compr_rate=4,
                                      lora_r=8, generation_top_k=1)
    ClaraTrainer(model, args, train_dataset=load_clara_jsonl(data, "instruct")).train()

    model.eval()
    predictions = model.answer(["What is the code word?"] * len(rows), [model.compress(row["docs"]) for row in rows],
                               max_new_tokens=4)
    f1 = sum(answer_f1(p, [row["answer"]]) for p, row in zip(predictions, rows)) / len(rows)
    assert f1 >= 0.9, list(zip(predictions, [row["answer"] for row in rows]))
