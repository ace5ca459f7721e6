"""`memory_projection="token_embeddings"`: memory reaches the generator as mixtures of token embeddings."""

import pytest
import torch

from conftest import make_tiny_clara
from modeling_clara import ClaraConfig, ClaraForRAG
from modeling_clara.data import make_collator
from modeling_clara.training import ClaraTrainingArguments, load_model_for_stage

DOCS = ["Paris is the capital of France.", "Mount Kilimanjaro is the highest mountain in Africa."]


@pytest.fixture
def projected_clara(tiny_llama_dir):
    return make_tiny_clara(tiny_llama_dir, seed=1, memory_projection="token_embeddings").eval()


def test_unknown_projection_is_an_error():
    with pytest.raises(ValueError, match="memory_projection='pca'"):
        ClaraConfig(memory_projection="pca")


def test_memory_is_the_expected_embedding_of_the_predicted_token(projected_clara):
    """Checked against the full causal-LM forward (its own LM head call) with the encoder adapter."""
    model = projected_clara
    inputs, _ = model.processor.encode_documents(DOCS)
    vocab = model.config.base_vocab_size
    with torch.no_grad(), model.adapter("encoder_adapter"):
        logits = model.decoder(**inputs).logits[:, -model.n_mem_tokens :, :vocab]
    expected = torch.softmax(logits, dim=-1) @ model.decoder.get_input_embeddings().weight[:vocab]
    torch.testing.assert_close(model.compress(DOCS), expected)


def test_query_reps_are_projected_too(projected_clara):
    """Retrieval compares questions and documents in the same (projected) space."""
    model = projected_clara
    reps = model.encode_queries(["What is the capital of France?"]).view(1, model.n_mem_tokens, -1)
    vocab = model.config.base_vocab_size
    embeddings = model.decoder.get_input_embeddings().weight[:vocab]
    # A convex mixture of token embeddings stays inside their per-dimension range; raw hidden states need not.
    assert (reps >= embeddings.min(dim=0).values - 1e-5).all() and (reps <= embeddings.max(dim=0).values + 1e-5).all()


def test_default_is_apples_raw_states(tiny_llama_dir):
    raw = make_tiny_clara(tiny_llama_dir, seed=1).eval()
    projected = make_tiny_clara(tiny_llama_dir, seed=1, memory_projection="token_embeddings").eval()
    inputs, _ = raw.processor.encode_documents(DOCS)
    with torch.no_grad(), raw.adapter("encoder_adapter"):
        states = raw._last_hidden_states(inputs["input_ids"], inputs["attention_mask"])[:, -raw.n_mem_tokens :]
    assert torch.equal(raw.compress(DOCS), states)
    assert not torch.allclose(projected.compress(DOCS), states)


def test_projection_survives_save_and_load(projected_clara, tmp_path):
    projected_clara.save_pretrained(tmp_path)
    loaded = ClaraForRAG.from_pretrained(str(tmp_path))
    assert loaded.config.memory_projection == "token_embeddings"
    assert torch.equal(loaded.compress(DOCS), projected_clara.compress(DOCS))


def test_answer_loss_reaches_the_encoder_through_the_projection(tiny_llama_dir):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2", memory_projection="token_embeddings")
    collator = make_collator("instruct", model.processor, top_k=1)
    outputs = model(**collator([{"question": "Capital of France?", "docs": [DOCS[0]], "answer": "Paris"}]))
    outputs.ce_loss.backward()
    encoder_grads = [p.grad for n, p in model.decoder.named_parameters() if "encoder_adapter" in n and "lora_A" in n]
    assert encoder_grads and all(g is not None for g in encoder_grads)
    assert sum(g.abs().sum() for g in encoder_grads) > 0


def test_training_cli_sets_it_on_fresh_models_and_refuses_to_change_a_checkpoint(tiny_llama_dir, tmp_path):
    args = ClaraTrainingArguments(output_dir=str(tmp_path / "run"), memory_projection="token_embeddings")
    model = load_model_for_stage(str(tiny_llama_dir), args)
    assert model.config.memory_projection == "token_embeddings"
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "raw")
    with pytest.raises(ValueError, match="memory_projection"):
        load_model_for_stage(str(tmp_path / "raw"), args)


def test_token_norm_keeps_each_states_direction_at_a_token_embeddings_norm(tiny_llama_dir):
    raw = make_tiny_clara(tiny_llama_dir, seed=1).eval()
    scaled = make_tiny_clara(tiny_llama_dir, seed=1, memory_projection="token_norm").eval()
    raw_memory, scaled_memory = raw.compress(DOCS), scaled.compress(DOCS)
    vocab = scaled.config.base_vocab_size
    token_norm = scaled.decoder.get_input_embeddings().weight[:vocab].norm(dim=-1).mean()
    torch.testing.assert_close(scaled_memory.norm(dim=-1), token_norm.expand(raw_memory.shape[:2]))
    cosine = torch.nn.functional.cosine_similarity(scaled_memory, raw_memory, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
