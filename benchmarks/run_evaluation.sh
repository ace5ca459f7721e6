#!/usr/bin/env bash
# Every number and figure of README's "Evaluation" section, in one resumable run (reruns skip finished examples).
#
#   bash benchmarks/run_evaluation.sh                                   # the shipped CLaRa, 15 questions per file
#   MODELS="ckpt/cr16 ckpt/cr128" bash benchmarks/run_evaluation.sh     # other checkpoints, e.g. one per rate
#   MODELS="embedded:16 embedded:128" bash ...                          # fresh (untrained) CLaRa on the embedded backbone
#   LIMIT= bash benchmarks/run_evaluation.sh                            # full files (slow on CPU)
#   BASELINES=0 bash benchmarks/run_evaluation.sh                       # CLaRa's rows only (a new model, same backbone)
#
# Baselines (closed book, text RAG with BM25 / MiniLM, text oracle) run once, on the first model's backbone; they
# do not depend on CLaRa's adapters, so BASELINES=0 skips them and the latency benchmark when only the model changed.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
LIMIT=${LIMIT-15}
OUT=${OUT:-eval_results}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
BATCH_SIZE=${BATCH_SIZE:-8}
MODELS=${MODELS:-shipped}
TOP_KS=${TOP_KS:-"5 2"}               # 5: the baselines' k (and the paper's); 2: what the shipped model trained with
EFFICIENCY_QUESTIONS=${EFFICIENCY_QUESTIONS:-5}
BASELINES=${BASELINES:-1}
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

first=$BASELINES
for model in $MODELS; do
  for k in $TOP_KS; do
    methods=(clara clara_wrong_memory)  # the control shows how much of the score comes from reading memory
    [ "$first" = 1 ] && methods+=(closed_book text_rag_bm25 text_rag_minilm text_oracle)
    # shellcheck disable=SC2046
    clara eval $(model_args "$model") "${common[@]}" --method "${methods[@]}" --setting normal oracle --top-k "$k" \
      --output-dir "$OUT/$(tag "$model")"
    first=0
  done
done

# Retrieval: the first model's query reasoner (a fresh one for `embedded`) against MiniLM, BM25 and chance.
first_model=${MODELS%% *}
retrieval_args=$(model_args "$first_model")
case "$first_model" in embedded:*) retrieval_args+=" --training-stage stage2" ;; esac
# shellcheck disable=SC2086
clara eval-retrieval $retrieval_args --data "$DATA" ${LIMIT:+--limit "$LIMIT"} --batch-size "$BATCH_SIZE" \
  --ranker clara bm25 minilm given_order --output-dir "$OUT/$(tag "$first_model")"

mkdir -p docs/results
[ "$BASELINES" = 1 ] && python benchmarks/bench_efficiency.py --data "$DATA/hotpotqa_dev.jsonl" \
  --n-questions "$EFFICIENCY_QUESTIONS" --k 5 --compr-rates 4 16 32 128 --max-new-tokens "$MAX_NEW_TOKENS" \
  --output docs/results/efficiency.json
result_dirs=()
for model in $MODELS; do result_dirs+=("$OUT/$(tag "$model")"); done
efficiency=()
[ -f docs/results/efficiency.json ] && efficiency=(--efficiency docs/results/efficiency.json)
python benchmarks/plot_results.py --results "${result_dirs[@]}" "${efficiency[@]}" --out docs/figures \
  --tables docs/results/tables.md
