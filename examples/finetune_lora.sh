#!/usr/bin/env bash
# Instruct fine-tuning with LoRA, in two steps on CPU (minutes): a short pretrain of the tiny model on the bundled
# corpus, then LoRA SFT on the bundled chat sample (Llama 3 chat template, loss on the answers only).
# For a real model: --model llama3_8b_instruct --pretrained-checkpoint <megallama checkpoint or HF folder>
#   --data-path chats.jsonl --bf16, launched with torchrun (add --tensor-model-parallel-size etc. as for pretraining).
# DRY_RUN=1 resolves the fine-tuning step's flags (finetune_llama.py --dry-run) and prints its memory estimate (as
# for one GPU); nothing trains. It needs the base checkpoint (BASE, default checkpoints/tiny_sft_base), which the
# first step of a run without DRY_RUN writes.
# Then chat with the result: python tools/generate.py --load checkpoints/tiny_lora --chat --prompt "How do I ...?"
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-checkpoints/tiny_sft_base}
SHAPE=(--model tiny_llama3_50m --num-layers 4 --hidden-size 256 --ffn-hidden-size 704 --num-attention-heads 8
  --num-query-groups 4 --device cpu)
PRETRAIN=(python pretrain_llama.py "${SHAPE[@]}" --seq-length 256 --micro-batch-size 8 --global-batch-size 16
  --train-iters 200 --lr 2e-3 --lr-warmup-iters 20 --save "$BASE" --save-interval 200)
SFT=("${SHAPE[@]}" --pretrained-checkpoint "$BASE"
  --strategy lora --lora-rank 16 --lora-alpha 32 --lora-target-modules all
  --seq-length 256 --sft-packing --micro-batch-size 8 --global-batch-size 16 --train-iters 100
  --lr 1e-3 --lr-warmup-iters 10 --eval-interval 50 --eval-iters 4
  --save checkpoints/tiny_lora --save-interval 100 --save-adapter checkpoints/tiny_lora/adapter)
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  if [ -n "${DRY_RUN:-}" ]; then
    echo "error: the base checkpoint $BASE does not exist; create it with: ${PRETRAIN[*]} (the first step of" \
      "bash examples/finetune_lora.sh), then run DRY_RUN=1 again" >&2
    exit 2
  fi
  "${PRETRAIN[@]}"
fi
if [ -n "${DRY_RUN:-}" ]; then
  exec python finetune_llama.py "${SFT[@]}" "$@" --dry-run
fi
exec python finetune_llama.py "${SFT[@]}" "$@"
