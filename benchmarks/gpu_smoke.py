"""GPU smoke test: a tiny random backbone through everything CLaRa does on CUDA, printing what passed and what failed.

    python benchmarks/gpu_smoke.py [--keep DIR]

On CUDA, in bf16: compress, retrieve, answer; one training step per stage (`clara train` pretrain -> instruct -> e2e,
`--bf16`); loading with `device_map="auto"`; 4-bit and 8-bit loading through bitsandbytes (`quantization="int4"` /
`"int8"`). Without CUDA it runs the same calls on CPU in fp32 and reports the CUDA-only checks as skipped. Exits 1
if any check failed. Needs the embedded backbone package (its tokenizer is the tiny backbone's).
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import resolve_embedded_backbone
from modeling_clara.processing_clara import load_tokenizer, save_tokenizer
from modeling_clara.cli.train import parse_train_args
from modeling_clara.training import train_clara

DOCS = ["Paris is the capital of France.", "The Seine flows through Paris.", "Kilimanjaro is in Tanzania."]
QUESTION = "Which river flows through Paris?"
TINY = dict(doc_max_length=32, compr_rate=8, generation_top_k=2, lora_r=4, max_new_tokens=4)


class SkipCheck(Exception):
    """A check that cannot run here (no CUDA, no bitsandbytes)."""


def make_tiny_backbone(path: Path, dtype: torch.dtype) -> Path:
    tokenizer = load_tokenizer(resolve_embedded_backbone())
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)  # later loads follow it (torch_dtype="auto")
    save_tokenizer(tokenizer, path)
    return path


def write_stage_data(folder: Path) -> dict[str, str]:
    rows = {
        "pretrain": [{"data_type": "qa", "question": ["Which river flows through Paris?"], "answers": ["The Seine"],
                      "docs": [DOCS[1]]}] * 2,
        "instruct": [{"question": QUESTION, "docs": DOCS[:2], "answer": "The Seine"}] * 2,
        "e2e": [{"question": QUESTION, "docs": DOCS, "gold_answer": "The Seine", "pos_index": [1]}] * 2,
    }
    paths = {}
    for stage, stage_rows in rows.items():
        paths[stage] = str(folder / f"{stage}.jsonl")
        Path(paths[stage]).write_text("".join(json.dumps(row) + "\n" for row in stage_rows))
    return paths


def check_inference(model: ClaraForRAG) -> str:
    embeds = model.compress(DOCS)
    if not torch.isfinite(embeds.float()).all():
        raise AssertionError("compress returned non-finite values")
    scores, indices = model.retrieve(QUESTION, embeds, k=2)
    answer = model.answer(QUESTION, embeds, k=2)
    return f"{embeds.dtype} on {embeds.device}; top-2 {indices.tolist()}; answer {answer!r}"


def check_training(backbone: Path, work: Path, cuda: bool) -> str:
    data = write_stage_data(work)
    common = ["--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--generation_top_k", "2"]
    common += ["--bf16", "true"] if cuda else ["--use_cpu", "true"]
    model, steps = str(backbone), []
    for stage, extra in (("pretrain", ["--doc_max_length", "32", "--compr_rate", "8", "--lora_r", "4"]),
                         ("instruct", []), ("e2e", ["--n_candidates", "3"])):
        output = work / stage
        result = train_clara(*parse_train_args(["--stage", stage, "--model", model, "--data", data[stage],
                                                 "--output_dir", str(output), *extra, *common]))
        steps.append(f"{stage}: step {result['global_step']}, loss {result.get('train_loss', float('nan')):.3f}")
        model = str(output)
    return "; ".join(steps)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SkipCheck("CUDA is not available")


def require_bitsandbytes() -> None:
    require_cuda()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise AssertionError("bitsandbytes is not installed (pip install bitsandbytes)") from error


def run_checks(work: Path) -> list[tuple[str, str, str]]:
    cuda = torch.cuda.is_available()
    dtype, device_map = (torch.bfloat16, {"": 0}) if cuda else (torch.float32, None)
    backbone = make_tiny_backbone(work / "tiny_backbone", dtype)

    def fresh(**kwargs) -> ClaraForRAG:
        return ClaraForRAG.from_backbone(str(backbone), training_stage="stage2", **{**TINY, **kwargs})

    def auto_device_map() -> str:
        require_cuda()
        model = fresh(torch_dtype=torch.bfloat16, device_map="auto")
        return f"devices {sorted({str(p.device) for p in model.parameters()})}; " + check_inference(model)

    def quantized(kind: str) -> str:
        require_bitsandbytes()
        model = fresh(device_map={"": 0}, quantization=kind)
        return check_inference(model)

    checks = {
        "compress / retrieve / answer": lambda: check_inference(fresh(torch_dtype=dtype, device_map=device_map)),
        "one training step per stage": lambda: check_training(backbone, work, cuda),
        'device_map="auto"': auto_device_map,
        "4-bit (bitsandbytes nf4)": lambda: quantized("int4"),
        "8-bit (bitsandbytes)": lambda: quantized("int8"),
    }
    results = []
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            detail, status = check(), "passed"
        except SkipCheck as skip:
            detail, status = str(skip), "skipped"
        except Exception as error:  # a smoke test reports every failure and goes on
            detail, status = f"{type(error).__name__}: {error}", "failed"
            traceback.print_exc()
        results.append((name, status, f"{detail} ({time.perf_counter() - start:.1f} s)"))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="Work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.keep or temporary)
        work.mkdir(parents=True, exist_ok=True)
        results = run_checks(work)
    print(f"\nGPU smoke test on {device}, torch {torch.__version__}")
    print("| check | result | detail |\n|---|---|---|")
    for name, status, detail in results:
        print(f"| {name} | {status} | {detail} |")
    counts = {status: sum(r[1] == status for r in results) for status in ("passed", "failed", "skipped")}
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
