"""The fast decoding loop (modeling_clara/decoding_clara.py) gives the tokens `generate` gives, or steps aside.

Each test compares the loop with `generate` on the same model and inputs, so it fails on a wrong token, a wrong
stop, a wrong padding or a cache mix-up; its speed is measured by benchmarks/bench_decoding.py, not here.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_clara
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_clara import ClaraForRAG
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.configuration_clara import DECODER_ADAPTER
from modeling_clara.decoding_clara import ClaraFastGenerator, greedy_settings

DOCS = [
    "Paris is the capital and largest city of France.",
    "The Nile is a major north-flowing river in northeastern Africa, and the longest river in Africa.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
]
QUESTIONS = ["What is the capital of France?", "Which river is the longest in Africa and where does it flow?"]


def both_paths(model: ClaraForRAG, inputs: dict, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`generate`'s new tokens and the fast loop's, for the same generator inputs and options."""
    with torch.no_grad(), model.adapter(DECODER_ADAPTER):
        reference = model.decoder.generate(**inputs, **{k: v for k, v in options.items() if k != "past_key_values"})
        fast = ClaraFastGenerator().generate(model.decoder, DECODER_ADAPTER, **inputs, **options)
    return reference, fast


@pytest.fixture(params=["tiny_llama_dir", "tiny_mistral_dir"])
def tiny_model(request) -> ClaraForRAG:
    return make_tiny_clara(request.getfixturevalue(request.param)).eval()


def memories_for(model: ClaraForRAG) -> list[torch.Tensor]:
    embeds = model.compress(DOCS)
    return [embeds[:2], embeds]  # different document counts: the shorter prompt is left-padded


def test_fast_loop_gives_generates_greedy_tokens_with_left_padding(tiny_model):
    inputs = tiny_model.generator_inputs(QUESTIONS, memories_for(tiny_model))
    assert not inputs["attention_mask"].all(), "the batch should hold a padded row"
    reference, fast = both_paths(tiny_model, inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert fast is not None
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)


def test_fast_loop_stops_and_pads_like_generate(tiny_model):
    inputs = tiny_model.generator_inputs(QUESTIONS, memories_for(tiny_model))
    free_run, _ = both_paths(tiny_model, inputs, max_new_tokens=8)
    # A token the first row greedily produces third, as end of sequence: that row stops there, the other goes on.
    eos = int(free_run[0, 2])
    reference, fast = both_paths(tiny_model, inputs, max_new_tokens=8, eos_token_id=eos)
    assert (reference == eos).any()
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    # min_new_tokens holds the end of sequence back.
    reference, fast = both_paths(tiny_model, inputs, max_new_tokens=8, min_new_tokens=5, eos_token_id=eos)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)


def test_answers_are_unchanged_with_and_without_the_cached_prompt_start(tiny_model):
    questions, memories = QUESTIONS, memories_for(tiny_model)
    tiny_model.fast_decoding = False
    expected = tiny_model.generate_from_memory(questions, memories, max_new_tokens=10)
    expected_from_start = tiny_model.generate_from_memory(
        questions, memories, max_new_tokens=10, prompt_start=tiny_model.cache_prompt_start()
    )
    tiny_model.fast_decoding = True
    assert tiny_model.generate_from_memory(questions, memories, max_new_tokens=10) == expected
    prompt_start = tiny_model.cache_prompt_start()
    fast_from_start = tiny_model.generate_from_memory(questions, memories, max_new_tokens=10, prompt_start=prompt_start)
    assert fast_from_start == expected_from_start
    assert prompt_start.past_key_values.get_seq_length() == len(prompt_start.input_ids), "the shared cache grew"


def test_answer_uses_the_fast_loop_and_falls_back_for_what_it_does_not_do(tiny_clara):
    tiny_clara.eval()
    embeds = tiny_clara.compress(DOCS)
    fast = tiny_clara._fast_generator
    assert tiny_clara.answer(QUESTIONS[0], embeds, k=2, num_beams=2, max_new_tokens=4) is not None
    assert fast._decoders == {}, "beam search must run through generate"
    torch.manual_seed(0)
    sampled = tiny_clara.answer(QUESTIONS[0], embeds, k=2, do_sample=True, top_k=5, max_new_tokens=4)
    assert isinstance(sampled, str) and fast._decoders == {}
    tiny_clara.answer(QUESTIONS[0], embeds, k=2, max_new_tokens=4)
    assert DECODER_ADAPTER in fast._decoders


class StopAfter:
    """`should_stop` that turns true at its `n`-th call, counting its calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def test_should_stop_ends_the_fast_loop_with_the_unstopped_tokens_so_far(tiny_model):
    inputs = tiny_model.generator_inputs(QUESTIONS, memories_for(tiny_model))
    with torch.no_grad(), tiny_model.adapter(DECODER_ADAPTER):
        full = ClaraFastGenerator().generate(tiny_model.decoder, DECODER_ADAPTER, **inputs, max_new_tokens=12,
                                             min_new_tokens=12)
        should_stop = StopAfter(5)
        stopped = ClaraFastGenerator().generate(tiny_model.decoder, DECODER_ADAPTER, **inputs, max_new_tokens=12,
                                                min_new_tokens=12, should_stop=should_stop)
    assert should_stop.calls == 5, "asked once per generated token"
    torch.testing.assert_close(stopped, full[:, :5], rtol=0, atol=0)


@pytest.mark.parametrize("fast_decoding", [True, False], ids=["fast-loop", "generate"])
def test_generate_from_memory_stops_when_asked_on_both_paths(tiny_clara, fast_decoding):
    tiny_clara.eval().fast_decoding = fast_decoding
    memories = memories_for(tiny_clara)
    inputs = tiny_clara.generator_inputs(QUESTIONS, memories)
    with torch.no_grad(), tiny_clara.adapter(DECODER_ADAPTER):
        full = tiny_clara.decoder.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert full.shape[1] == 12
    should_stop = StopAfter(4)
    stopped = tiny_clara.generate_from_memory(QUESTIONS, memories, max_new_tokens=12, min_new_tokens=12,
                                              should_stop=should_stop)
    assert should_stop.calls == 4
    expected = tiny_clara.tokenizer.batch_decode(full[:, :4], skip_special_tokens=True)
    assert stopped == [text.strip() for text in expected]
    assert (DECODER_ADAPTER in tiny_clara._fast_generator._decoders) == fast_decoding


@pytest.mark.parametrize(
    "options",
    [{"do_sample": True}, {"num_beams": 2}, {"repetition_penalty": 1.3}, {"stop_strings": ["."]},
     {"top_k": 3, "do_sample": True}],
)
def test_options_the_loop_does_not_implement_go_to_generate(tiny_clara, options):
    assert greedy_settings(tiny_clara.decoder.generation_config, {"max_new_tokens": 4, **options}) is None
    assert greedy_settings(tiny_clara.decoder.generation_config, {"max_new_tokens": 4}) is not None


def test_merged_weights_follow_changes_to_the_adapter(tiny_model):
    inputs = tiny_model.generator_inputs(QUESTIONS, memories_for(tiny_model))
    generator = ClaraFastGenerator()
    with torch.no_grad(), tiny_model.adapter(DECODER_ADAPTER):
        before = generator.generate(tiny_model.decoder, DECODER_ADAPTER, **inputs, max_new_tokens=6, min_new_tokens=6)
        for name, parameter in tiny_model.decoder.named_parameters():
            if f"lora_B.{DECODER_ADAPTER}" in name:
                parameter.mul_(-3.0)  # in place, as an optimizer step changes it
        after = generator.generate(tiny_model.decoder, DECODER_ADAPTER, **inputs, max_new_tokens=6, min_new_tokens=6)
        reference = tiny_model.decoder.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
    torch.testing.assert_close(after, reference, rtol=0, atol=0)
    assert not torch.equal(before, after), "the changed adapter should change the answer"


def test_training_mode_and_other_backbones_go_to_generate(tiny_clara, tiny_tokenizer):
    inputs = tiny_clara.generator_inputs(QUESTIONS[:1], [tiny_clara.compress(DOCS[:2])])
    tiny_clara.train()
    with torch.no_grad():
        assert ClaraFastGenerator().generate(tiny_clara.decoder, DECODER_ADAPTER, **inputs, max_new_tokens=3) is None
    biased = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tiny_tokenizer), attention_bias=True)
    ).eval()
    embeds = biased.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    with torch.no_grad():
        assert ClaraFastGenerator().generate(
            biased, None, inputs_embeds=embeds, attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=3
        ) is None


@pytest.mark.integration
@pytest.mark.slow
def test_shipped_model_answers_the_same_with_the_fast_loop():
    model = ClaraForRAG.from_pretrained("shipped").eval()
    passages = [json.loads(line)["text"] for line in Path(SHIPPED_CORPUS_FILE).read_text().splitlines()[:3]]
    embeds = model.compress(passages)
    questions = ["Where is the National Palace Museum?", "What is this passage about?"]
    memories = [embeds[:2], embeds]
    inputs = model.generator_inputs(questions, memories)
    reference, fast = both_paths(model, inputs, max_new_tokens=32, min_new_tokens=32)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    model.fast_decoding = False
    expected = model.generate_from_memory(questions, memories, prompt_start=model.cache_prompt_start())
    model.fast_decoding = True
    assert model.generate_from_memory(questions, memories, prompt_start=model.cache_prompt_start()) == expected


def test_vllm_export_with_the_decoder_adapter_merged_answers_as_the_adapter_does(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from modeling_clara.serving.vllm_generator import export_backbone, prompt_embeddings

    merged = AutoModelForCausalLM.from_pretrained(export_backbone(tiny_model, tmp_path, merge_adapter=DECODER_ADAPTER))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    memories = memories_for(tiny_model)
    for embeds in prompt_embeddings(tiny_model, QUESTIONS, memories):
        inputs = {"inputs_embeds": embeds[None], "attention_mask": torch.ones(1, len(embeds), dtype=torch.long)}
        with torch.no_grad():
            merged_ids = merged.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
            with tiny_model.adapter(DECODER_ADAPTER):
                adapter_ids = tiny_model.decoder.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
                adapter_logits = tiny_model.decoder(**inputs).logits
            torch.testing.assert_close(merged(**inputs).logits, adapter_logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged_ids, adapter_ids, rtol=0, atol=0)


def test_efficiency_benchmark_users_view_compares_clara_and_text_rag(tiny_llama_dir, tmp_path, capsys):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "clara")
    rows = [{"id": str(i), "question": q, "docs": DOCS, "pos_index": [0], "answers": ["x"]} for i, q in
            enumerate(QUESTIONS * 2)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_efficiency.py"
    spec = importlib.util.spec_from_file_location("bench_efficiency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    results = bench.main(["--users", "--model", str(tmp_path / "clara"), "--data", str(tmp_path / "dev.jsonl"),
                          "--n-questions", "3", "--latency-questions", "2", "--k", "1", "3", "--max-new-tokens", "4",
                          "--kv-budget-mib", "1"])
    torch.set_num_threads(threads)  # the benchmark measures on one thread
    assert list(results) == [1, 3]
    for k, summary in results.items():
        clara, text = summary["clara"], summary["text"]
        assert clara["answer_tokens_mean"] > 0 and clara["fly_s_mean"] > clara["answer_s_mean"]
        assert text["fly_s_mean"] == text["answer_s_mean"]
        assert clara["largest_batch"] >= text["largest_batch"] >= 1, "shorter prompts fit more questions"
        assert set(clara["questions_per_s"]) >= {1}
    assert "| 3 | CLaRa |" in capsys.readouterr().out
