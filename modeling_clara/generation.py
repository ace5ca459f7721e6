"""Greedy generation with a plain causal LM: the backbone's generation defaults CLaRa decodes with
([`configure_greedy_generation`]), and text in, text out ([`generate_completions`]) for the text baselines of
`clara eval` and the local generator of `clara synthesize`. Carried into saved checkpoints beside the model file."""

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


def configure_greedy_generation(generation_config: GenerationConfig, pad_token_id: int | None) -> None:
    """Greedy decoding by default: a backbone's sampling defaults (top_p, temperature) are cleared."""
    generation_config.do_sample = False
    generation_config.top_p = None
    generation_config.top_k = None
    generation_config.temperature = None
    generation_config.pad_token_id = pad_token_id


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
    **generate_kwargs,
) -> list[str]:
    """The completion of each prompt, stripped; greedy unless `generate_kwargs` ask for sampling.

    Prompts are already formatted (chat template applied) and are tokenized without special tokens, padded on the
    tokenizer's side (left, for a batch to generate together).
    """
    inputs = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        **{"do_sample": False, **generate_kwargs},
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (batch, generated), prompts stripped
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


__all__ = ["configure_greedy_generation", "generate_completions"]
