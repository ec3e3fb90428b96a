#!/usr/bin/env bash
# ColossalChat's three alignment stages (SFT, reward model, PPO), plus DPO and a round of rejection sampling, on the
# real 260K-parameter tinyllamas model (stories260K) and the real Anthropic HH-RLHF harmless-base pairs, ending in a
# before/after table: held-out reward-model accuracy, the mean reward of each policy's answers to held-out prompts
# (scored by a judge reward model trained on other pairs than anything else here), and the KL to the SFT model.
#   ./align_demo.sh                 # about 8 minutes on 2 CPU cores
#   ./align_demo.sh runs/mine       # another run folder
# Each step is one llamakit command; rerunning skips the work that is already done. A 260K-parameter model learns
# little about harmlessness: expect small effects, and reward-model accuracies a little above 0.5.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/align}
PAIRS=${PAIRS:-../shared/assets/preference/hh-rlhf_harmless-base_test.jsonl.gz}
DATA=$OUT/data
SFT=$OUT/sft/final
LAST=$SECONDS
took() { echo "   ($((SECONDS - LAST)) s)"; LAST=$SECONDS; }

echo "== 1/9 split: the pairs by prompt into disjoint parts: rm_train (reward model, DPO, PPO and RS prompts, and"
echo "        its chosen dialogs as SFT data), rm_judge (the judge reward model only), heldout (the report only)"
[ -f "$DATA/sft.jsonl" ] || python -m llamakit.train.align_report split "$PAIRS" --out "$DATA"
took

echo "== 2/9 SFT: full fine-tuning on the chosen HH-RLHF dialogs in the Llama 2 chat format, loss on the answers"
llamakit finetune configs/finetune/tiny-sft.yaml --data.path "$DATA/sft.jsonl" --data.format chat \
  --data.chat_format llama2 --checkpoint.out_dir "$OUT/sft" --resume
took

echo "== 3/9 reward model (for training): the SFT model with a scalar head, pairwise loss on rm_train"
llamakit reward configs/reward/tiny-reward.yaml --model.path "$SFT" --data.path "$DATA/rm_train.jsonl" \
  --data.max_examples null --train.max_steps 60 --checkpoint.every 20 --eval.every 20 \
  --checkpoint.out_dir "$OUT/rm_train" --resume
took

echo "== 4/9 judge reward model: the same recipe on the disjoint rm_judge pairs (another seed); scores the report"
llamakit reward configs/reward/tiny-reward.yaml --model.path "$SFT" --data.path "$DATA/rm_judge.jsonl" \
  --data.max_examples null --train.max_steps 60 --checkpoint.every 20 --eval.every 20 --train.seed 1 \
  --checkpoint.out_dir "$OUT/rm_judge" --resume
took

echo "== 5/9 PPO: LoRA on the SFT model against the training reward model (the value model starts from it), 16"
echo "        rollouts of 32 rm_train prompts, 2 epochs each, the scores whitened (Llama 2), KL penalty 0.05 per token"
llamakit ppo configs/ppo/tiny-ppo.yaml --model.path "$SFT" --ppo.reward_model "$OUT/rm_train/final" \
  --data.path "$DATA/rm_train.jsonl" --data.max_examples null --data.seq_len 256 --ppo.max_new_tokens 64 \
  --ppo.whiten_scores true --ppo.kl_coef 0.05 --optim.lr 1e-3 --train.max_steps 64 --checkpoint.every 32 \
  --checkpoint.out_dir "$OUT/ppo" --resume
took

echo "== 6/9 DPO: LoRA on the SFT model, the SFT model as the reference, on the rm_train pairs"
llamakit dpo configs/dpo/tiny-dpo.yaml --model.path "$SFT" --data.path "$DATA/rm_train.jsonl" \
  --data.max_examples null --checkpoint.out_dir "$OUT/dpo" --resume
took

echo "== 7/9 rejection sampling: 4 answers from the SFT model to 256 rm_train prompts, the training reward model's best kept"
[ -f "$OUT/rs/best.jsonl" ] || llamakit rejection-sample --checkpoint "$SFT" --prompts "$DATA/rm_train.jsonl" \
  --reward-model "$OUT/rm_train/final" --samples 4 --max-prompts 256 --max-new-tokens 64 --temperature 1.0 \
  --top-p 1.0 --seed 0 --batch-size 64 --output "$OUT/rs/best.jsonl"
took

echo "== 8/9 rejection sampling: LoRA fine-tuning of the SFT model on the best answers (a dialog too long for the"
echo "        window is dropped: cutting its end would cut the sampled answer)"
llamakit finetune configs/finetune/tiny-lora.yaml --model.path "$SFT" --data.path "$OUT/rs/best.jsonl" \
  --data.format chat --data.chat_format llama2 --data.truncation drop --data.packing true --train.max_steps 16 \
  --checkpoint.every 8 --eval.every 8 --checkpoint.out_dir "$OUT/rs/sft" --resume
took

echo "== 9/9 report: one answer per held-out prompt from each policy (the same seeds), scored by both reward models"
python -m llamakit.train.align_report report --sft "$SFT" --policy "PPO=$OUT/ppo/final" \
  --policy "DPO=$OUT/dpo/final" --policy "RS=$OUT/rs/sft/final" --prompts "$DATA/heldout.jsonl" \
  --judge "$OUT/rm_judge/final" --train-rm "$OUT/rm_train/final" --max-prompts 128 --max-new-tokens 64 \
  --output "$OUT/report.json"
took
echo "total: $SECONDS s"
