"""Training throughput of a CLaRa stage-1 step next to a plain LoRA fine-tuning step of the same backbone.

Both sides run forward + backward + AdamW step over the same number of token positions, interleaved round by round
so machine noise hits both alike:

- CLaRa (stage 1, as `ClaraTrainer` runs it): the encoder adapter compresses each document (`doc_max_length + 3 +
  n_mem` positions), the decoder adapter reads the memory tokens and is trained on the QA target; the model's loss
  (CE + 0.1 MSE); encoder + decoder LoRA and the memory rows of the embedding matrix train.
- Plain LoRA (peft on the bare backbone, same LoRA config): the document followed by the same chat conversation as
  text, cut or padded to exactly the CLaRa step's encoder + decoder positions; loss CE on every token.

    python benchmarks/bench_training_throughput.py --backbone embedded --batch-size 2 --rounds 3
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import resolve_backbone_path
from modeling_clara.data import load_clara_jsonl, make_collator
from modeling_clara.training import ClaraTrainingArguments, prepare_model_for_stage

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clara_pretrain_sample.jsonl"


def plain_batch(clara_batch: dict, rows: list[dict], processor) -> dict:
    """The plain-LoRA batch: document + conversation as text, exactly as many positions as the CLaRa batch."""
    tokenizer = processor.tokenizer
    length = clara_batch["enc_input_ids"].shape[1] + clara_batch["dec_input_ids"].shape[1]
    sequences = []
    for row in rows:
        conversation = processor.build_prompt(1, "qa", row["questions"], row["answers"])[1]
        text = conversation.replace(processor.document_slots(1), row["docs"][0])  # the document as plain text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        sequences.append([tokenizer.pad_token_id] * (length - len(ids)) + ids)
    input_ids = torch.tensor(sequences)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def timed_step(model, optimizer, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--compr-rate", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per side (after one warm-up step each)")
    args = parser.parse_args()

    torch.manual_seed(0)
    clara = ClaraForRAG.from_backbone(args.backbone, doc_max_length=args.doc_max_length, compr_rate=args.compr_rate,
                                      training_stage="stage1")
    prepare_model_for_stage(clara, ClaraTrainingArguments(output_dir="unused", stage="pretrain", report_to="none"))
    clara.train()
    lora = clara.lora_config
    plain = get_peft_model(
        AutoModelForCausalLM.from_pretrained(resolve_backbone_path(args.backbone)),
        LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.lora_alpha, target_modules="all-linear",
                   lora_dropout=lora.lora_dropout),
    )
    plain.train()
    optimizers = {
        "clara": torch.optim.AdamW([p for p in clara.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0),
        "plain": torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0),
    }
    models = {"clara": clara, "plain": plain}

    dataset = load_clara_jsonl(args.data, "pretrain", max_samples=args.batch_size * (args.rounds + 1))
    collator = make_collator("pretrain", clara.processor, top_k=1)
    batches = []
    for start in range(0, len(dataset), args.batch_size):
        rows = [dataset[i] for i in range(start, start + args.batch_size)]
        clara_batch = collator(rows)
        batches.append({"clara": clara_batch, "plain": plain_batch(clara_batch, rows, clara.processor)})
    tokens = {name: [b[name]["input_ids" if name == "plain" else "dec_input_ids"].numel()
                     + (b[name]["enc_input_ids"].numel() if name == "clara" else 0) for b in batches] for name in models}

    seconds = {name: [] for name in models}
    for round_index, batch in enumerate(batches):
        for name in models:  # interleaved: both sides see the same machine state
            elapsed = timed_step(models[name], optimizers[name], batch[name])
            if round_index:  # the first step of each side is warm-up
                seconds[name].append(elapsed)
    rates = {name: statistics.median(t / s for t, s in zip(tokens[name][1:], seconds[name])) for name in models}
    result = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "tokens_per_step": {name: statistics.mean(tokens[name][1:]) for name in models},
        "clara_stage1_tokens_per_s": round(rates["clara"], 1),
        "plain_lora_tokens_per_s": round(rates["plain"], 1),
        "clara_over_plain": round(rates["clara"] / rates["plain"], 3),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"CLaRa stage-1 step: {rates['clara']:.0f} tokens/s | plain LoRA step: {rates['plain']:.0f} tokens/s | "
          f"ratio {result['clara_over_plain']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
