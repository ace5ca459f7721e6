#!/usr/bin/env bash
# Stage 1 (Apple `stage1`, salient compressor pretraining) on the embedded SmolLM2-135M-Instruct backbone.
#
# Data: Apple's SCP sample, split by document into train / held-out by examples/shipped_model/prepare_data.py
# (made on first use). Loss: CE on the QA target + 0.1 * MSE; encoder + decoder adapters and memory rows train.
# Hyper-parameters are Apple's (lr 1e-4, cosine to 0.1 * lr, warmup 3 %, AdamW betas 0.9/0.95) except the batch:
# 2 x 8 accumulation = 16 instead of 128, for a CPU. Extra arguments go to `clara train`, e.g. --max_steps 20.
#
#   bash examples/train_stage1_pretrain.sh [--max_steps N ...]
#   torchrun --nproc_per_node 2 -m modeling_clara.cli train ...   # the same on 2 processes (gloo on CPU)
set -euo pipefail
DATA=${DATA:-runs/data}
OUT=${OUT:-runs/stage1}
[ -f "$DATA/stage1_pretrain.jsonl" ] || python examples/shipped_model/prepare_data.py --out-dir "$DATA"

clara train --stage pretrain --model "${MODEL:-embedded}" \
  --data "$DATA/stage1_pretrain.jsonl" --eval_data "$DATA/stage1_heldout.jsonl" \
  --output_dir "$OUT" --doc_max_length 256 --compr_rate 16 \
  --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --num_train_epochs 1 \
  --per_device_eval_batch_size 4 --eval_strategy steps --eval_steps 25 --eval_on_start true \
  --logging_steps 5 --save_steps 25 --save_total_limit 2 "$@"
# Interrupted? Run the same command with --resume_from_checkpoint latest.
