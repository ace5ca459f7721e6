#!/usr/bin/env bash
# Reproduces the CLaRa shipped in modeling_clara/shipped/clara-smollm2-135m (see model_cards/clara-smollm2-135m.md):
# the three stages on the embedded SmolLM2-135M-Instruct backbone, on one CPU, with `clara train` only.
#
# Data: Apple's SCP sample (../shared/data/clara_pretrain_sample.jsonl) split by document into 900 training and 100
# held-out documents (prepare_data.py). No file of ../shared/data's evaluation sets (2wiki/hotpotqa/musique/nq dev)
# is read. The budget (steps) fits a 2-core CPU in about an hour and a half; scale the steps on better hardware.
#
#   bash examples/shipped_model/train.sh            # writes runs/shipped/{data,stage1,stage2,stage3}
#   OUT=/tmp/shipped STEPS_SCALE=0.1 bash examples/shipped_model/train.sh   # a quick dry run
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/shipped}
SCALE=${STEPS_SCALE:-1}
steps() { python -c "print(max(1, round($1 * $SCALE)))"; }
export HF_HUB_OFFLINE=1

python examples/shipped_model/prepare_data.py --out-dir "$OUT/data" --instruct-docs 2 --e2e-candidates 4
head -n 20 "$OUT/data/stage1_heldout.jsonl" > "$OUT/data/stage1_eval.jsonl"
head -n 20 "$OUT/data/heldout_qa.jsonl" > "$OUT/data/e2e_eval.jsonl"
python - "$OUT/data" <<'EOF'
import json, sys
# Held-out instruct rows: the first two candidates of held-out e2e rows that contain the gold document.
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/e2e_eval.jsonl")]
with open(f"{sys.argv[1]}/instruct_eval.jsonl", "w") as out:
    for row in rows:
        gold = row["pos_index"][0]
        docs = [row["docs"][gold]] + [d for i, d in enumerate(row["docs"]) if i != gold][:1]
        out.write(json.dumps({"question": row["question"], "docs": docs, "answer": row["gold_answer"]}) + "\n")
EOF

common=(--per_device_eval_batch_size 4 --eval_strategy steps --eval_on_start true --logging_steps 5
        --save_total_limit 1 --disable_tqdm true --dataloader_pin_memory false --seed 0)

# Stage 1 (salient compressor pretraining): each document -> its QA pairs, CE + 0.1 * MSE.
clara train --stage pretrain --model embedded --data "$OUT/data/stage1_pretrain.jsonl" \
  --eval_data "$OUT/data/stage1_eval.jsonl" --doc_max_length 256 --compr_rate 16 --learning_rate 2e-4 \
  --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_steps "$(steps 50)" \
  --eval_steps "$(steps 50)" --save_steps "$(steps 25)" --output_dir "$OUT/stage1" "${common[@]}"

# Stage 2 (instruction tuning): question + [gold, BM25 distractor] in random order -> answer.
clara train --stage instruct --model "$OUT/stage1" --data "$OUT/data/stage2_instruct.jsonl" \
  --eval_data "$OUT/data/instruct_eval.jsonl" --generation_top_k 2 --learning_rate 2e-4 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_steps "$(steps 80)" \
  --eval_steps "$(steps 80)" --save_steps "$(steps 40)" --output_dir "$OUT/stage2" "${common[@]}"

# Stage 3 (end to end): the query reasoner (initialised from the encoder) picks 2 of 4 candidates through the
# straight-through top-k; the answer's CE trains it and the decoder. The compressor is frozen.
clara train --stage e2e --model "$OUT/stage2" --data "$OUT/data/stage3_e2e.jsonl" \
  --eval_data "$OUT/data/e2e_eval.jsonl" --generation_top_k 2 --learning_rate 5e-5 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_steps "$(steps 40)" \
  --eval_steps "$(steps 40)" --save_steps "$(steps 20)" --output_dir "$OUT/stage3" "${common[@]}"
