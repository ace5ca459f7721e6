#!/usr/bin/env bash
# Reproduces the CLaRa shipped in modeling_clara/shipped/clara-smollm2-135m (model_cards/clara-smollm2-135m.md): the
# three stages on the embedded SmolLM2-135M-Instruct backbone with `clara train --recipe small` (README, "Teaching a
# small backbone to read its memory"), lora_r 8, on a 2-core CPU.
#
# Data: Apple's SCP sample (../shared/data/clara_pretrain_sample.jsonl) split by document into 900 training and 100
# held-out documents (prepare_data.py). No file of ../shared/data's evaluation sets (2wiki/hotpotqa/musique/nq dev)
# is read. Every stage saves checkpoints and resumes from its latest one when run again (a stage whose
# model.safetensors exists is skipped), so an interrupted run goes on where it stopped. Scale the steps (STEPS_SCALE)
# on better hardware.
#
#   bash examples/shipped_model/train.sh                      # writes runs/shipped/{data,stage1a,stage1b,stage2,stage3}
#   OUT=/tmp/shipped STEPS_SCALE=0.02 bash examples/shipped_model/train.sh   # a quick dry run
#   python examples/shipped_model/export.py --run runs/shipped/stage3 --data runs/shipped/data
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/shipped}
SCALE=${STEPS_SCALE:-1}
steps() { python -c "print(max(1, round($1 * $SCALE)))"; }
export HF_HUB_OFFLINE=1

# --reconstruction: every training document is also a row whose target is the document itself.
python examples/shipped_model/prepare_data.py --out-dir "$OUT/data" --instruct-docs 2 --e2e-candidates 4 \
  --reconstruction

common=(--recipe small --lora_r 8 --logging_steps 5 --save_total_limit 2 --disable_tqdm true
        --dataloader_pin_memory false --seed 0)
# `python -m` runs the package beside this script (the checkout), not whichever `clara` is first on PATH.
run_stage() {
  local out=$1; shift
  [ -f "$out/model.safetensors" ] && return 0
  local resume=()
  ls -d "$out"/checkpoint-* >/dev/null 2>&1 && resume=(--resume_from_checkpoint latest)
  python -m modeling_clara.cli train --output_dir "$out" "${common[@]}" "${resume[@]}" "$@"
}

# Stage 1a, doc_max_length 64 / compr_rate 4 (16 memory tokens): reconstruct each training document's first 40 words
# from its memory, with the recipe's random-word channel rows mixed in (the prior cannot predict them, so only the
# memory lowers their loss). This is the learnability ladder's rung 3a, arm `small`.
run_stage "$OUT/stage1a" --stage pretrain --model embedded --data "$OUT/data/stage1_short.jsonl" \
  --doc_max_length 64 --compr_rate 4 --per_device_train_batch_size 4 --max_steps "$(steps 300)" \
  --save_steps "$(steps 25)"

# Stage 1b at the shipped length, doc_max_length 256 / compr_rate 16: the same 16 memory tokens (a length curriculum)
# now hold whole documents. Apple's stage-1 QA rows and the whole-document reconstruction rows, channel rows mixed
# in. This is rung 3c, arm `small`, continued from 3a.
run_stage "$OUT/stage1b" --stage pretrain --model "$OUT/stage1a" --data "$OUT/data/stage1_pretrain.jsonl" \
  --doc_max_length 256 --compr_rate 16 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_steps "$(steps 60)" \
  --save_steps "$(steps 20)"

# Stage 2 (instruction tuning): question + [gold, BM25 distractor] in random order -> answer. The recipe freezes the
# compressor here (--freeze_compressor is its default, spelled out): answer loss alone would let it collapse to one
# memory for every document (rung 2 of the ladder), so only the generator learns to answer from the memory stage 1
# taught the compressor to write.
run_stage "$OUT/stage2" --stage instruct --model "$OUT/stage1b" --data "$OUT/data/stage2_instruct.jsonl" \
  --freeze_compressor --generation_top_k 2 --per_device_train_batch_size 4 --max_steps "$(steps 60)" \
  --save_steps "$(steps 20)"

# Stage 3 (end to end): the query reasoner (initialised from the encoder) picks 2 of 4 candidates through the
# straight-through top-k; the answer's CE and the recipe's InfoNCE warm-up over pos_index train it and the decoder.
# The compressor stays frozen (as in Apple's stage 2).
run_stage "$OUT/stage3" --stage e2e --model "$OUT/stage2" --data "$OUT/data/stage3_e2e.jsonl" \
  --generation_top_k 2 --per_device_train_batch_size 4 --max_steps "$(steps 30)" --save_steps "$(steps 10)"
