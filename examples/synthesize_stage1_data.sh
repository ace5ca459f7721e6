#!/usr/bin/env bash
# Stage-1 data for your own corpus: QA pairs and paraphrases written and verified by a generator LM, then a short
# stage-1 run on them. Defaults run offline on a CPU: the embedded SmolLM2-135M-Instruct writes data for the first
# 8 passages of the bundled corpus (about 10 minutes on 2 cores; that corpus is the shipped model's held-out set,
# so this trains a separate demo model under runs/synthesis/). For real data point GENERATOR at a large
# instruct model, or ENDPOINT at an OpenAI-compatible server (e.g. vLLM) serving it.
#
#   bash examples/synthesize_stage1_data.sh
#   CORPUS=passages.jsonl LIMIT= GENERATOR=Qwen/Qwen2.5-7B-Instruct bash examples/synthesize_stage1_data.sh
#   CORPUS=passages.jsonl LIMIT= ENDPOINT=http://127.0.0.1:8000/v1 GENERATOR=Qwen/Qwen2.5-32B-Instruct bash ...
set -euo pipefail
CORPUS=${CORPUS:-shipped}
OUTPUT_DIR=${OUTPUT_DIR:-runs/synthesis}
LIMIT=${LIMIT-8}

# Killed? Run the same command again: it continues after the last finished passage.
clara synthesize --corpus "$CORPUS" --output-dir "$OUTPUT_DIR" --generator "${GENERATOR:-embedded}" \
  ${ENDPOINT:+--endpoint "$ENDPOINT"} ${LIMIT:+--limit "$LIMIT"}

clara train --stage pretrain --model embedded --data "$OUTPUT_DIR/pretrain.jsonl" --output-dir "$OUTPUT_DIR/stage1" \
  --doc_max_length 256 --compr_rate 16 --per_device_train_batch_size 2 --max_steps "${MAX_STEPS:-10}" \
  --logging_steps 1
