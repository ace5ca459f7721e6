"""Property-based checks of CLaRa's input construction: encoder layout, prompt slots, padding and batching."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_clara

# Any text a user may send: mixed scripts, emoji, control characters; at least one visible character.
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=120
).filter(lambda t: t.strip())
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=[True, False], ids=["sep", "no_sep"])
def model(request, tiny_llama_dir):
    return make_tiny_clara(tiny_llama_dir, sep=request.param, different_mem_tokens=request.param)


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=5))
def test_encoder_layout(model, texts):
    inputs, n_truncated = model.processor.encode_documents(texts)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n_mem = model.n_mem_tokens
    assert ids.shape == (len(texts), model.processor.encoder_length)
    assert (ids[:, -n_mem:] == torch.tensor(model.processor.mem_token_ids)).all()
    assert mask[:, -n_mem:].all()
    for row_ids, row_mask in zip(ids, mask):
        first = int(row_mask.argmax())
        assert not row_mask[:first].any() and row_mask[first:].all()  # left padding only
        assert row_ids[first] == model.processor.enc_token_id
        assert row_ids[first + 1] == model.tokenizer.bos_token_id
    assert 0 <= n_truncated <= len(texts)


@SETTINGS
@given(question=TEXT, n_docs=st.integers(min_value=1, max_value=6))
def test_document_slots_hold_the_documents(model, question, n_docs):
    prompt, _ = model.processor.build_prompt(n_docs, question=question)
    inputs = model.processor.tokenize_prompts([prompt])
    doc_embeds = torch.randn(n_docs, model.n_mem_tokens, model.hidden_size)
    embeds = model._replace_memory_embeddings(inputs["input_ids"], doc_embeds, [n_docs])[0]
    ids = inputs["input_ids"][0]
    mem_ids = torch.tensor(model.processor.mem_token_ids)
    first = int(torch.isin(ids, mem_ids).int().argmax())
    slot = model.n_mem_tokens + (1 if model.config.sep else 0)
    for j in range(n_docs):
        start = first + j * slot
        torch.testing.assert_close(embeds[start : start + model.n_mem_tokens], doc_embeds[j])
    if model.config.sep:  # every <SEP> keeps its own embedding, and every memory token was replaced
        sep_positions = (ids == model.processor.sep_token_id).nonzero().flatten()
        sep_row = model.decoder.get_input_embeddings().weight[model.processor.sep_token_id]
        for position in sep_positions[:n_docs]:
            torch.testing.assert_close(embeds[position], sep_row)
        assert int(torch.isin(ids[first : first + n_docs * slot], mem_ids).sum()) == n_docs * model.n_mem_tokens


@SETTINGS
@given(texts=st.lists(TEXT, min_size=2, max_size=4))
def test_compression_is_batch_invariant(model, texts):
    batched = model.compress(texts)
    alone = torch.cat([model.compress([t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(questions=st.lists(TEXT, min_size=2, max_size=3), doc_counts=st.lists(st.integers(1, 3), min_size=3, max_size=3))
def test_batching_does_not_change_generator_inputs(model, questions, doc_counts):
    """Left-padded batches give each prompt the same next-token logits as running it alone."""
    doc_counts = doc_counts[: len(questions)]
    selected = [torch.randn(n, model.n_mem_tokens, model.hidden_size) for n in doc_counts]

    def last_logits(qs, docs):
        prompts = [model.processor.build_prompt(len(d), question=q)[0] for q, d in zip(qs, docs)]
        inputs = model.processor.tokenize_prompts(prompts)
        embeds = model._replace_memory_embeddings(inputs["input_ids"], torch.cat(docs), [len(d) for d in docs])
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), model.adapter("decoder_adapter"):
            return model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]

    batched = last_logits(questions, selected)
    for i, (question, docs) in enumerate(zip(questions, selected)):
        torch.testing.assert_close(batched[i], last_logits([question], [docs])[0], atol=1e-4, rtol=1e-4)
