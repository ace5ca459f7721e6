#!/usr/bin/env bash
# Stage 3 (Apple `stage2`, end to end) from the stage-2 model: the query reasoner picks the top-k of each question's
# candidates with the straight-through top-k (temperature 0.02), and the answer loss trains it with the decoder.
#
# The stage-2 model has no query reasoner: it starts as a copy of the encoder adapter (--query_reasoner_init
# encoder, Apple's chaining; `fresh` for a new LoRA). The compressor stays frozen; candidates are compressed without
# gradients. Apple's stage-3 settings: lr 5e-6 constant, decoder max length 1024 (the stage defaults). Every row
# needs the same number of candidates (--n_candidates trims them, gold ones kept). --retrieval_weight > 0 adds a
# supervised contrastive warm-up over pos_index (CLaRa itself uses none).
#
#   bash examples/train_stage3_e2e.sh [--max_steps N ...]
set -euo pipefail
DATA=${DATA:-runs/data}
OUT=${OUT:-runs/stage3}
[ -f "$DATA/stage3_e2e.jsonl" ] || python examples/shipped_model/prepare_data.py --out-dir "$DATA"

clara train --stage e2e --model "${MODEL:-runs/stage2}" \
  --data "$DATA/stage3_e2e.jsonl" --eval_data "$DATA/heldout_qa.jsonl" --n_candidates 8 --generation_top_k 3 \
  --output_dir "$OUT" --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --num_train_epochs 1 \
  --per_device_eval_batch_size 4 --eval_strategy steps --eval_steps 50 \
  --logging_steps 10 --save_steps 50 --save_total_limit 2 "$@"
