"""Compression throughput of `ClaraForRAG.compress` next to a plain forward of the same backbone.

Both sides process the same encoder token ids (CLaRa's layout: doc_max_length + 3 + n_mem tokens per document),
interleaved round by round so machine noise hits both alike. The plain side is what a naive implementation does
(Apple's `_compr_decoder`): the full causal-LM forward with logits and every layer's hidden states.

    python benchmarks/bench_compress.py --backbone embedded --n-docs 64 --batch-size 8 --rounds 3
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import load_backbone, resolve_backbone_path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clara_pretrain_sample.jsonl"


def load_documents(path: Path, n_docs: int) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            documents.extend(json.loads(line)["docs"])
            if len(documents) >= n_docs:
                break
    return documents[:n_docs]


def plain_backbone(model: ClaraForRAG) -> PreTrainedModel:
    """The model's backbone loaded again on its own, without LoRA layers, its vocabulary resized to CLaRa's tokenizer
    so that it reads the same token ids."""
    config = model.config
    backbone = load_backbone(resolve_backbone_path(config.decoder_model_name), config, torch_dtype=model.dtype)
    backbone.resize_token_embeddings(len(model.tokenizer))
    return backbone.to(model.device).eval()


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()  # scoped, not set_grad_enabled: main() may run in-process (tests)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-docs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--compr-rate", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = ClaraForRAG.from_backbone(args.backbone, doc_max_length=args.doc_max_length, compr_rate=args.compr_rate)
    documents = load_documents(args.data, args.n_docs)
    batches = [documents[i : i + args.batch_size] for i in range(0, len(documents), args.batch_size)]
    encoded = [model.processor.encode_documents(batch)[0] for batch in batches]

    def clara_compress():
        model.compress(documents, batch_size=args.batch_size, show_progress_bar=False)

    backbone = plain_backbone(model)

    def plain_forward():
        # The bare backbone: full forward with logits and all hidden states.
        for inputs in encoded:
            backbone(**inputs, output_hidden_states=True)

    clara_compress(), plain_forward()  # warm-up
    clara_times, plain_times = [], []
    for _ in range(args.rounds):
        clara_times.append(time_call(clara_compress))
        plain_times.append(time_call(plain_forward))
    clara_s, plain_s = statistics.median(clara_times), statistics.median(plain_times)
    tokens = sum(int(inputs["attention_mask"].numel()) for inputs in encoded)
    print(f"backbone={args.backbone} docs={len(documents)} tokens/doc={model.processor.encoder_length} "
          f"batch={args.batch_size} threads={torch.get_num_threads()} rounds={args.rounds} (median)")
    print("| path | seconds | docs/s | tokens/s |")
    print("|---|---|---|---|")
    for name, seconds in (("ClaraForRAG.compress", clara_s), ("plain backbone forward", plain_s)):
        print(f"| {name} | {seconds:.2f} | {len(documents) / seconds:.1f} | {tokens / seconds:.0f} |")
    print(f"throughput ratio compress / plain forward: {plain_s / clara_s:.2f}x")


if __name__ == "__main__":
    main()
