#!/usr/bin/env bash
# Stage 2 (Apple `stage1_2`, instruction tuning) from the stage-1 model: question + top-k documents -> answer.
#
# Data: {question, docs, answer} rows from examples/shipped_model/prepare_data.py (gold document + BM25
# distractors). The generator reads the first --generation_top_k documents of each row in the given order.
# Loss: CE on the answer + 0.1 * MSE (Apple's --mse_loss); encoder + decoder adapters and memory rows train.
#
#   bash examples/train_stage2_instruct.sh [--max_steps N ...]
set -euo pipefail
DATA=${DATA:-runs/data}
OUT=${OUT:-runs/stage2}
[ -f "$DATA/stage2_instruct.jsonl" ] || python examples/shipped_model/prepare_data.py --out-dir "$DATA"

clara train --stage instruct --model "${MODEL:-runs/stage1}" \
  --data "$DATA/stage2_instruct.jsonl" --eval_holdout 200 --generation_top_k 3 \
  --output_dir "$OUT" --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --num_train_epochs 1 \
  --per_device_eval_batch_size 8 --eval_strategy steps --eval_steps 50 \
  --logging_steps 10 --save_steps 50 --save_total_limit 2 "$@"
