#!/usr/bin/env bash
# Every number and figure of docs/evaluation.md, in one resumable run (rerunning skips finished examples).
#
#   bash benchmarks/run_evaluation.sh                                   # untrained `embedded` CLaRa, CR 4/16/32/128
#   MODELS="ckpt/cr16 ckpt/cr128" bash benchmarks/run_evaluation.sh     # trained checkpoints, one per rate
#   LIMIT= bash benchmarks/run_evaluation.sh                            # full files (slow on CPU)
#
# Baselines (closed book, text RAG with BM25 / MiniLM, text oracle) run once on the first model's backbone.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
LIMIT=${LIMIT-50}
OUT=${OUT:-eval_results}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
BATCH_SIZE=${BATCH_SIZE:-8}
MODELS=${MODELS:-"embedded:16 embedded:4 embedded:32 embedded:128"}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

common=(--data "$DATA" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size "$BATCH_SIZE")
[ -n "$LIMIT" ] && common+=(--limit "$LIMIT")

model_args() {  # "embedded:16" -> --model embedded --compr-rate 16; anything else -> --model <it>
  case "$1" in
    embedded:*) echo "--model embedded --compr-rate ${1#embedded:}" ;;
    *) echo "--model $1" ;;
  esac
}
tag() { case "$1" in embedded:*) echo "embedded-cr${1#embedded:}" ;; *) basename "$1" ;; esac; }

first=1
for model in $MODELS; do
  methods=(clara)
  [ "$first" = 1 ] && methods+=(closed_book text_rag_bm25 text_rag_minilm text_oracle)
  # shellcheck disable=SC2046
  clara eval $(model_args "$model") "${common[@]}" --method "${methods[@]}" --setting normal oracle \
    --output-dir "$OUT/$(tag "$model")"
  first=0
done

# Retrieval: the first model's query reasoner (a fresh one for `embedded`) against MiniLM, BM25 and chance.
first_model=${MODELS%% *}
retrieval_args=$(model_args "$first_model")
case "$first_model" in embedded:*) retrieval_args+=" --training-stage stage2" ;; esac
# shellcheck disable=SC2086
clara eval-retrieval $retrieval_args --data "$DATA" ${LIMIT:+--limit "$LIMIT"} --batch-size "$BATCH_SIZE" \
  --output-dir "$OUT/retrieval-$(tag "$first_model")"

python benchmarks/bench_efficiency.py --data "$DATA/hotpotqa_dev.jsonl" --n-questions 20 --k 5 \
  --compr-rates 4 16 32 128 --max-new-tokens 32 --output docs/results/efficiency.json
python benchmarks/plot_results.py --results "$OUT" --efficiency docs/results/efficiency.json \
  --out docs/figures --tables docs/results/tables.md
