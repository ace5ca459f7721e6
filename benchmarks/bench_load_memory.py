"""Peak RAM of loading an Apple-format CLaRa in bf16, relative to the size of its bf16 weights.

No 7B checkpoint can be downloaded here, so this builds a synthetic Mistral backbone in bf16 (default ~1.1B
parameters, the 7B's shapes scaled down), wraps it in an Apple-format CLaRa folder (adapters.pth +
decoder_first_last_layers.pth), then loads it with `ClaraForRAG.from_pretrained` in a fresh process and reads
the peak resident memory. A loader that made an fp32 copy on the way would show a ratio above 2; the ratio
times 14.5 GB (Mistral-7B in bf16) estimates the 7B's peak.

    python benchmarks/bench_load_memory.py --work-dir /tmp/clara-mem
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import resolve_embedded_backbone
from modeling_clara.convert_apple import clara_to_apple

MISTRAL_7B_BF16_GB = 14.48  # 7.24B parameters x 2 bytes

# VmHWM is the peak of this process's own memory map (ru_maxrss would carry over the parent's peak across exec).
PEAK = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024"
MEASURE = f"""
import sys, torch
from modeling_clara import ClaraForRAG
model = ClaraForRAG.from_pretrained(sys.argv[1])
assert model.dtype == torch.bfloat16, model.dtype
print({PEAK})
"""
IMPORTS_ONLY = f"import torch, transformers, peft, modeling_clara; print({PEAK})"


def build_apple_folder(work_dir: Path, hidden: int, layers: int) -> tuple[Path, int]:
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedded_backbone())
    config = MistralConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 3.5), num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), vocab_size=len(tokenizer),
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    backbone = MistralForCausalLM(config).to(torch.bfloat16)
    n_parameters = sum(p.numel() for p in backbone.parameters())
    backbone.save_pretrained(work_dir / "backbone")
    tokenizer.save_pretrained(work_dir / "backbone")
    del backbone
    clara = ClaraForRAG.from_backbone(str(work_dir / "backbone"), training_stage="stage2")
    clara.save_pretrained(work_dir / "ours")
    del clara
    clara_to_apple(str(work_dir / "ours"), str(work_dir / "apple"))
    return work_dir / "apple", n_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="clara-mem-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    apple_dir, n_parameters = build_apple_folder(work_dir, args.hidden, args.layers)
    weights_bytes = 2 * n_parameters
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(apple_dir)], capture_output=True, text=True, check=True)
    peak = int(measured.stdout.strip().splitlines()[-1])
    baseline = subprocess.run([sys.executable, "-c", IMPORTS_ONLY], capture_output=True, text=True, check=True)
    imports = int(baseline.stdout.strip().splitlines()[-1])
    ratio = (peak - imports) / weights_bytes
    print(f"backbone: {n_parameters / 1e9:.2f}B parameters, bf16 weights {weights_bytes / 2**30:.2f} GiB")
    print(f"peak RSS loading the Apple-format folder: {peak / 2**30:.2f} GiB (imports alone: {imports / 2**30:.2f} GiB)")
    print(f"(peak - imports) / bf16 weights: {ratio:.2f}  (an fp32 copy on the way would be >= 2)")
    print(f"estimated CLaRa-7B peak: {imports / 2**30 + ratio * MISTRAL_7B_BF16_GB * 1e9 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
