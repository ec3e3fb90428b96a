#!/usr/bin/env bash
# The whole pretraining path, on a corpus every Python install has: the standard library's own source.
#   ./demo.sh                                  # about 3 minutes on 2 CPU cores
#   CORPUS="my_texts/**/*.txt" PROMPT="The " ./demo.sh runs/mine   # the same on your own text
# Each step is one llamakit command; rerunning skips the work that is already done.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
CORPUS=${CORPUS:-"$STDLIB/*.py"}
PROMPT=${PROMPT:-$'import os\n\ndef '}

echo "== 1/4 tokenizer: a 2048-token SentencePiece BPE (digits split, byte fallback), trained on $CORPUS"
[ -f "$OUT/tokenizer.model" ] || llamakit tokenizer train "$CORPUS" --output "$OUT/tokenizer.model" --vocab-size 2048

echo "== 2/4 prepare: clean, drop boilerplate lines and duplicates, tokenize, pack into shards"
llamakit prepare "$CORPUS" --tokenizer "$OUT/tokenizer.model" --output "$OUT/data" --val-fraction 0.02

echo "== 3/4 pretrain: a small Llama with the LLaMA recipe (AdamW 0.9/0.95, wd 0.1, warmup + cosine, clip 1.0)"
llamakit pretrain configs/pretrain/demo.yaml --data.path "$OUT/data" --checkpoint.out_dir "$OUT/model" --resume

echo "== 4/4 generate: a sample from the trained model"
llamakit generate --checkpoint "$OUT/model/final" --temperature 0.7 --max-new-tokens 200 --seed 0 "$PROMPT"
