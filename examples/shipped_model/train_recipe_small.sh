#!/usr/bin/env bash
# The retraining of the shipped CLaRa with `clara train --recipe small` (README "Teaching a small backbone to read its
# memory"), in progress: it does not yet produce a model that answers from its memory, so the shipped model is still
# the one examples/shipped_model/train.sh reproduces. Three stages on the embedded SmolLM2-135M-Instruct, lora_r 8.
#
# Data: Apple's SCP sample (../shared/data/clara_pretrain_sample.jsonl) split by document into 900 training and 100
# held-out documents (prepare_data.py). No file of ../shared/data's evaluation sets (2wiki/hotpotqa/musique/nq dev)
# is read. Every stage saves checkpoints: rerun with RESUME=1 after an interruption and each unfinished stage resumes
# from its latest one; a finished stage is skipped. Scale the steps (STEPS_SCALE) on better hardware.
#
#   bash examples/shipped_model/train_recipe_small.sh      # writes runs/shipped_small/{data,stage1,stage2,stage3}
#   RESUME=1 bash examples/shipped_model/train_recipe_small.sh   # go on after an interruption
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/shipped_small}
SCALE=${STEPS_SCALE:-1}
steps() { python -c "print(max(1, round($1 * $SCALE)))"; }
export HF_HUB_OFFLINE=1

python examples/shipped_model/prepare_data.py --out-dir "$OUT/data" --instruct-docs 2 --e2e-candidates 4
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

common=(--recipe small --lora_r 8 --logging_steps 10 --save_total_limit 1 --disable_tqdm true
        --dataloader_pin_memory false --seed 0)
# A finished stage (its model.safetensors saved) is skipped; RESUME=1 continues an interrupted one.
run_stage() {
  local out=$1; shift
  [ -f "$out/model.safetensors" ] && return 0
  local resume=()
  [ "${RESUME:-0}" = 1 ] && ls -d "$out"/checkpoint-* >/dev/null 2>&1 && resume=(--resume_from_checkpoint latest)
  clara train --output_dir "$out" "${common[@]}" "${resume[@]}" "$@"
}

# Stage 1 at doc_max_length 64 / compr_rate 4 (16 memory tokens): reconstruct each training passage's first 40 words,
# with random-word-list rows mixed in (the recipe's channel rows): the prior cannot predict them, so the generator
# learns from the first steps that its memory holds the text. No MSE.
run_stage "$OUT/stage1" --stage pretrain --model embedded --data "$OUT/data/stage1_short.jsonl" \
  --doc_max_length 64 --compr_rate 4 --per_device_train_batch_size 4 --max_steps "$(steps 200)" \
  --save_steps "$(steps 25)"

# Stage 2 (instruction tuning) at the shipped length, doc_max_length 256 / compr_rate 16: the same 16 memory tokens
# (a length curriculum), question + [gold, BM25 distractor] in random order -> answer.
run_stage "$OUT/stage2" --stage instruct --model "$OUT/stage1" --data "$OUT/data/stage2_instruct.jsonl" \
  --eval_data "$OUT/data/instruct_eval.jsonl" --per_device_eval_batch_size 4 --eval_strategy steps \
  --doc_max_length 256 --compr_rate 16 --generation_top_k 2 --per_device_train_batch_size 4 \
  --max_steps "$(steps 20)" --eval_steps "$(steps 20)" --save_steps "$(steps 10)"

# Stage 3 (end to end): the query reasoner (initialised from the encoder) picks 2 of 4 candidates through the
# straight-through top-k; the answer's CE and the recipe's InfoNCE warm-up over pos_index train it and the decoder.
run_stage "$OUT/stage3" --stage e2e --model "$OUT/stage2" --data "$OUT/data/stage3_e2e.jsonl" \
  --eval_data "$OUT/data/e2e_eval.jsonl" --per_device_eval_batch_size 4 --eval_strategy steps \
  --generation_top_k 2 --per_device_train_batch_size 4 --max_steps "$(steps 15)" --eval_steps "$(steps 15)" \
  --save_steps "$(steps 5)"
