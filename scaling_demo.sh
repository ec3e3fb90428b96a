#!/usr/bin/env bash
# Scaling laws from a real sweep of tiny Llamas on Tiny Shakespeare, as Llama 3 used them: fit the laws on small
# runs, then read off the compute-optimal size for a budget and predict a larger run's loss before training it.
#   ./scaling_demo.sh                     # a few minutes on 2 CPU cores (runs 2 at a time, one thread each)
#   SIZES=16x1,32x1,64x2 FLOPS=1e11,3e11 ./scaling_demo.sh runs/my-sweep   # another grid
# Each step is one llamakit command; rerunning skips the work that is already done (finished runs are skipped,
# interrupted ones resume).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/scaling}
CORPUS=${CORPUS:-../shared/assets/corpus/tinyshakespeare_input.txt}
SIZES=${SIZES:-16x1,24x1,32x1,48x1}   # DIMxLAYERS: 4k to 25k non-embedding parameters
FLOPS=${FLOPS:-1e10,2e10,4e10}        # compute budgets C = 6ND: each size trains on C / 6N tokens (IsoFLOP design)
PLOT=${PLOT:-docs/scaling-sweep.png}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/4 tokenizer: a 512-token SentencePiece BPE trained on $CORPUS"
[ -f "$OUT/tokenizer.model" ] || llamakit tokenizer train "$CORPUS" --output "$OUT/tokenizer.model" --vocab-size 512

echo "== 2/4 prepare: one document per speech (blank-line separated), 5% held out for validation"
[ -f "$OUT/data/meta.json" ] || llamakit prepare "$CORPUS" --separator $'\n\n' --tokenizer "$OUT/tokenizer.model" \
    --output "$OUT/data" --val-fraction 0.05

echo "== 3/4 sweep: sizes $SIZES x compute budgets $FLOPS, each run with its own cosine schedule"
llamakit scaling sweep configs/scaling/tiny-sweep.yaml --sizes "$SIZES" --flops "$FLOPS" --out "$OUT/sweep" \
    --set data.path="$OUT/data" --jobs 2

echo "== 4/4 fit: Chinchilla's parametric law and IsoFLOP profiles, with bootstrap intervals"
mkdir -p "$(dirname "$PLOT")"
llamakit scaling fit "$OUT/sweep" --budget 1e11 --budget 1e12 --predict 50000,5e6 --bootstrap 200 \
    --plot "$PLOT" --json "$OUT/fit.json"
