"""ClaraForRAG on tiny random backbones: shapes, adapters, retrieval, answering, saving, input errors."""

import json
import logging as std_logging
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel
from transformers.utils import logging

from conftest import TINY_CLARA_KWARGS, make_tiny_clara
from modeling_clara import ClaraConfig, ClaraForRAG
from modeling_clara.modeling_clara import differentiable_topk

DOCS = [
    "Paris is the capital of France.",
    "The Seine flows through Paris and into the English Channel.",
    "Mount Kilimanjaro is the highest mountain in Africa.",
    "Water boils at 100 degrees Celsius at sea level.",
]


def test_compress_shape_and_dtype(tiny_clara):
    embeds = tiny_clara.compress(DOCS, batch_size=3)
    assert embeds.shape == (len(DOCS), tiny_clara.n_mem_tokens, tiny_clara.hidden_size)
    assert embeds.dtype == tiny_clara.dtype
    assert tiny_clara.n_mem_tokens == TINY_CLARA_KWARGS["doc_max_length"] // TINY_CLARA_KWARGS["compr_rate"]


def test_compress_does_not_compute_logits(tiny_clara, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the LM head ran during compress")

    monkeypatch.setattr(tiny_clara.decoder.lm_head, "forward", fail)
    tiny_clara.compress(DOCS[:2])


def test_compress_skipping_padding_equals_the_full_layout(tiny_clara):
    full = tiny_clara.compress(DOCS, batch_size=2)
    torch.testing.assert_close(tiny_clara.compress(DOCS, batch_size=2, skip_padding=True), full, atol=1e-5, rtol=1e-4)


def test_an_adapters_weights_load_from_another_adapters(tiny_llama_dir):
    model = make_tiny_clara(tiny_llama_dir)
    question = "Which river flows through Paris?"
    model.load_adapter_state_dict("query_reasoner_adapter", model.adapter_state_dict("encoder_adapter"))
    # The query reasoner now computes what the compressor does: a question's query is its memory, flattened.
    torch.testing.assert_close(model.encode_queries(question), model.compress(question).flatten(1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="'no_such_adapter'"):
        model.load_adapter_state_dict("no_such_adapter", model.adapter_state_dict("encoder_adapter"))


def test_three_adapters_on_one_backbone_warn_nothing(tiny_llama_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_tiny_clara(tiny_llama_dir)
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]


def test_truncation_summary_counts_documents_once_per_call(tiny_clara, caplog):
    long_doc = "word " * 200
    logging.enable_propagation()
    try:
        with caplog.at_level(std_logging.INFO):
            tiny_clara.compress([long_doc, DOCS[0], long_doc], batch_size=1)
    finally:
        logging.disable_propagation()
    assert "2 of 3 documents are longer than doc_max_length=32" in caplog.text
    assert caplog.text.count("doc_max_length") == 1  # one summary for the call, not one per batch


def test_adapters_give_different_states(tiny_clara):
    inputs, _ = tiny_clara.processor.encode_documents(DOCS[:2])
    states = {}
    for name in tiny_clara.adapter_names:
        with torch.no_grad(), tiny_clara.adapter(name):
            states[name] = tiny_clara._last_hidden_states(inputs["input_ids"], inputs["attention_mask"])
    names = list(states)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not torch.allclose(states[first], states[second]), (first, second)


def test_adapter_context_restores_active_and_trainable(tiny_clara):
    tiny_clara.set_trainable_adapters(["query_reasoner_adapter", "decoder_adapter"])
    tiny_clara.set_active_adapters(["decoder_adapter"])
    with tiny_clara.adapter("encoder_adapter"):
        assert tiny_clara.active_adapter_names == ["encoder_adapter"]
    assert tiny_clara.active_adapter_names == ["decoder_adapter"]
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in tiny_clara.decoder.named_parameters() if p.requires_grad and "lora_" in n}
    assert trainable == {"query_reasoner_adapter", "decoder_adapter"}
    with pytest.raises(ValueError, match="adapter 'nope'"):
        with tiny_clara.adapter("nope"):
            pass


@pytest.mark.parametrize(
    "stage, trained",
    [("stage1", {"encoder_adapter", "decoder_adapter"}), ("stage2", {"query_reasoner_adapter", "decoder_adapter"})],
)
def test_trainable_parameters_per_stage(tiny_llama_dir, stage, trained):
    model = make_tiny_clara(tiny_llama_dir, training_stage=stage)
    model.set_trainable_adapters()
    lora = {n for n, p in model.decoder.named_parameters() if p.requires_grad and "lora_" in n}
    assert {n.split(".lora_")[1].split(".")[1] for n in lora} == trained
    embedding_trains = model.decoder.get_input_embeddings().weight.requires_grad
    assert embedding_trains == ("encoder_adapter" in trained)
    others = [n for n, p in model.decoder.named_parameters() if p.requires_grad and "lora_" not in n]
    assert others == (["model.embed_tokens.weight"] if embedding_trains else [])


def test_memory_rows_are_the_only_embedding_rows_with_gradient(tiny_llama_dir):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1")
    model.set_trainable_adapters()
    model.train()
    inputs, _ = model.processor.encode_documents(DOCS[:2])
    embeds, mse = model._encode_documents(inputs["input_ids"], inputs["attention_mask"])
    (embeds.sum() + mse).backward()
    grad = model.decoder.get_input_embeddings().weight.grad
    rows_with_grad = set(grad.abs().sum(-1).nonzero().flatten().tolist())
    assert rows_with_grad and rows_with_grad <= set(model.processor.mem_token_ids)


def test_retrieve_ranks_with_cosine_and_handles_ragged_candidates(tiny_clara):
    embeds = tiny_clara.compress(DOCS)
    scores, indices = tiny_clara.retrieve("Which river flows through Paris?", embeds, k=3)
    assert scores.shape == indices.shape == (3,)
    assert (scores[:-1] >= scores[1:]).all()
    query = tiny_clara.encode_queries(["Which river flows through Paris?"])[0].float()
    cosine = torch.nn.functional.cosine_similarity(query, embeds[indices[0]].flatten().float(), dim=0)
    torch.testing.assert_close(scores[0], cosine, atol=1e-4, rtol=1e-4)
    ragged_scores, ragged = tiny_clara.retrieve(["q one", "q two"], [embeds, embeds[:2]], k=3)
    assert [len(i) for i in ragged] == [3, 2]  # fewer candidates than k: all of them, ranked


def test_questions_encode_without_their_padding_as_with_it(tiny_clara):
    # The query reasoner skips the columns every question pads (the layout pads to doc_max_length + 3); the kept
    # tokens keep their positions, so the states are the padded pass's.
    questions = ["Which river flows through Paris?", "a longer question about the rivers and mountains of France?"]
    inputs, _ = tiny_clara._encoder_inputs(questions)
    assert not inputs["attention_mask"][:, 0].any()  # the layout pads: there is something to skip
    with tiny_clara.adapter("query_reasoner_adapter"):
        padded = tiny_clara._last_hidden_states(inputs["input_ids"], inputs["attention_mask"])
    expected = padded[:, -tiny_clara.n_mem_tokens :].flatten(start_dim=1)
    torch.testing.assert_close(tiny_clara.encode_queries(questions), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tiny_clara.encode_queries(questions[:1]), expected[:1], atol=1e-5, rtol=1e-4)


def test_retrieve_without_query_reasoner_is_an_error(tiny_llama_dir):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    with pytest.raises(ValueError, match="query_reasoner_adapter"):
        model.retrieve("a question", model.compress(DOCS[:2]))


def test_answer_batched_equals_single(tiny_clara):
    embeds = tiny_clara.compress(DOCS)
    questions = ["Which river flows through Paris?", "How high is Kilimanjaro, the highest mountain of Africa?"]
    per_question = [embeds[:1], embeds[1:4]]  # different numbers of documents: left padding
    batched = tiny_clara.answer(questions, per_question, k=2, return_dict=True)
    single = [tiny_clara.answer(q, e, k=2, return_dict=True) for q, e in zip(questions, per_question)]
    assert batched == single
    assert set(batched[0]) == {"answer", "doc_indices", "scores"}
    assert batched[0]["doc_indices"] == [0] and batched[0]["scores"] is None  # no more candidates than k
    assert len(batched[1]["doc_indices"]) == 2 and len(batched[1]["scores"]) == 2  # retrieved top-2 of 3


def test_answer_reads_given_order_without_query_reasoner(tiny_llama_dir):
    model = make_tiny_clara(tiny_llama_dir, training_stage="stage1_2")
    result = model.answer("q?", model.compress(DOCS), return_dict=True)
    assert result["doc_indices"] == [0, 1, 2, 3]
    assert isinstance(result["answer"], str)


def test_differentiable_topk_is_hard_forward_soft_backward():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]], requires_grad=True)
    weights, indices = differentiable_topk(scores, k=2, temperature=0.5)
    assert indices.tolist() == [[1, 2]]
    assert torch.equal(weights.detach(), torch.tensor([[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]]))
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (weights @ values).sum().backward()

    # Backward is the soft path's: slot 1 a softmax over all candidates, slot 2 over those slot 1 did not take.
    def soft_objective(s):
        not_taken = torch.log(torch.tensor([1.0, 0.0, 1.0, 1.0]) + 1e-8)
        return torch.softmax(s / 0.5, -1) @ values + torch.softmax(s / 0.5 + not_taken, -1) @ values

    _, expected = torch.autograd.functional.vjp(soft_objective, scores.detach(), torch.ones(1))
    torch.testing.assert_close(scores.grad, expected)
    assert scores.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["tiny_llama_dir", "tiny_mistral_dir"])
def test_save_and_load_round_trip(request, backbone, tmp_path):
    model = make_tiny_clara(request.getfixturevalue(backbone), seed=3)
    with torch.no_grad():
        model.decoder.get_input_embeddings().weight[-2:] += 0.5  # trained added rows must survive
    model.save_pretrained(tmp_path)
    loaded = ClaraForRAG.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.compress(DOCS), model.compress(DOCS))
    embeds = model.compress(DOCS)
    assert loaded.answer("Which river?", embeds, return_dict=True) == model.answer("Which river?", embeds, return_dict=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_clara.ClaraConfig", "AutoModel": "modeling_clara.ClaraForRAG"}
    assert {"modeling_clara.py", "configuration_clara.py", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    weights = load_file(tmp_path / "model.safetensors")
    backbone_parameters = sum(p.numel() for p in model.decoder.parameters())
    assert sum(t.numel() for t in weights.values()) < backbone_parameters / 3
    assert all(k.split(".")[0] in ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter", "added_tokens") for k in weights)
    assert isinstance(AutoModel.from_pretrained(str(tmp_path)), ClaraForRAG)


def test_config_validation():
    assert ClaraConfig(doc_max_length=256, compr_rate=16).n_mem_tokens == 16
    with pytest.raises(ValueError, match="compr_rate=64"):
        ClaraConfig(doc_max_length=32, compr_rate=64)
    with pytest.raises(ValueError, match="training_stage='stage9'"):
        ClaraConfig(training_stage="stage9")
    with pytest.raises(ValueError, match="doc_max_length=0"):
        ClaraConfig(doc_max_length=0)


def test_from_pretrained_rejects_unknown_arguments(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="compress_rate"):
        ClaraForRAG.from_pretrained(str(tmp_path), compress_rate=32)


@pytest.mark.parametrize(
    "override, message",
    [({"compr_rate": 0}, "compr_rate=0"), ({"training_stage": "stage9"}, "training_stage='stage9'"),
     ({"generation_top_k": 0}, "generation_top_k=0")],
)
def test_from_pretrained_overrides_are_checked_as_the_config_checks_them(tiny_llama_dir, tmp_path, override, message):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        ClaraForRAG.from_pretrained(str(tmp_path), **override)
    assert ClaraForRAG.from_pretrained(str(tmp_path), generation_top_k=3).config.generation_top_k == 3


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, e: m.compress([]), TypeError, "`documents`"),
        (lambda m, e: m.compress(None), TypeError, "`documents`"),
        (lambda m, e: m.compress(["ok", 3]), TypeError, r"`documents\[1\]`"),
        (lambda m, e: m.compress(["ok", "   "]), ValueError, r"`documents\[1\]` is empty"),
        (lambda m, e: m.compress(["ok"], batch_size=0), ValueError, "`batch_size`"),
        (lambda m, e: m.answer("q", e[0]), ValueError, r"doc_embeds\[0\] has shape"),
        (lambda m, e: m.answer("q", e[..., :7]), ValueError, "hidden_size"),
        (lambda m, e: m.answer("q", e[:, :1]), ValueError, "n_mem_tokens"),
        (lambda m, e: m.answer("q", e * float("nan")), ValueError, "NaN"),
        (lambda m, e: m.answer("q", e.long()), TypeError, "dtype"),
        (lambda m, e: m.answer("q", e[:0]), ValueError, "zero documents"),
        (lambda m, e: m.answer(["q1", "q2"], [e]), ValueError, "2 questions but 1"),
        (lambda m, e: m.retrieve("q", e, k=0), ValueError, "`k`"),
        (lambda m, e: m.answer("", e), ValueError, "empty"),
        (lambda m, e: m.answer("q"), ValueError, "doc_embeds"),
        (lambda m, e: m.generate_from_text(["a", "b"], [["d"], ["d", "e"]]), ValueError, "same number of documents"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_clara, call, error, message):
    embeds = tiny_clara.compress(DOCS[:2])
    with pytest.raises(error, match=message):
        call(tiny_clara, embeds)


NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_prompt_falls_back_when_the_template_rejects_system_role(tiny_llama_dir):
    """As Apple's code: system prompt and user turn merged into one user turn, joined by a newline."""
    model = make_tiny_clara(tiny_llama_dir)
    model.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    prompt, conversation = model.processor.build_prompt(1, question="Who?", answer="Me.")
    slots = "".join(model.processor.mem_tokens) + "<SEP>"
    from modeling_clara.processing_clara import SYSTEM_PROMPT_ANSWER

    assert prompt == f"<start_of_turn>user\n{SYSTEM_PROMPT_ANSWER}\nBackground:\n{slots}\n\nQuestion:Who?<end_of_turn>\n<start_of_turn>model\n"
    assert conversation.startswith(prompt.removesuffix("<start_of_turn>model\n"))
    assert conversation.endswith("<start_of_turn>assistant\nMe.<end_of_turn>\n")
    model.tokenizer.chat_template = "{{ raise_exception('something else') }}"
    with pytest.raises(Exception, match="something else"):
        model.processor.build_prompt(1, question="Who?")


def test_stage1_qa_prompt_joins_all_pairs_into_one_target(tiny_clara):
    from modeling_clara.processing_clara import SYSTEM_PROMPT_QA

    prompt, conversation = tiny_clara.processor.build_prompt(1, task="qa", question=["q1?", "q2?"], answer=["a1", "a2"])
    slots = "".join(tiny_clara.processor.mem_tokens) + "<SEP>"
    assert SYSTEM_PROMPT_QA in prompt and f"Background:\n{slots}" in prompt
    assert conversation.startswith(prompt)
    assert "Question: q1?\nAnswer: a1\nQuestion: q2?\nAnswer: a2" in conversation[len(prompt):]


def test_a_fresh_clara_prints_no_notice_about_its_new_token_rows(tiny_llama_dir):
    """Mean-initialised rows for CLaRa's tokens are the model's choice; transformers' notice about them is dropped."""
    logging.warning_once.cache_clear()  # transformers prints each message once per process
    records = []
    handler = std_logging.Handler()
    handler.emit = records.append
    std_logging.getLogger("transformers").addHandler(handler)
    try:
        make_tiny_clara(tiny_llama_dir)
    finally:
        std_logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "new embeddings" in r.getMessage()], [r.getMessage() for r in records]
