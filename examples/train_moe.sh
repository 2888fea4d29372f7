#!/usr/bin/env bash
# A mixture-of-experts model: 8 experts, top-2 routing, every other layer sparse, on 4 GPUs; EP=2 splits the
# experts over 2 GPUs (--expert-model-parallel-size 2: tokens move by all-to-all, expert grads are reduced over
# the expert-data-parallel group; ZeRO stages 0-3).
# Each log line carries the aux/z losses and the tokens-per-expert histogram of every sparse layer.
# On CPU: python pretrain_llama.py --model tiny_llama3_50m --device cpu --strategy moe --num-experts 4 ...
# DRY_RUN=1 resolves the flags for GPUS GPUs and prints the per-GPU memory estimate (one process, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-4}
ARGS=(--model tiny_llama3_150m --bf16
  --strategy moe --num-experts 8 --moe-router-topk 2 --moe-layer-freq 2
  --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --expert-model-parallel-size "${EP:-1}"
  --seq-length 1024 --micro-batch-size 8 --global-batch-size 64 --train-iters 500
  --lr 1e-3 --lr-warmup-iters 50 --log-interval 10 --save checkpoints/moe --load checkpoints/moe
  --save-interval 250)
if [ -n "${DRY_RUN:-}" ]; then
  exec python -m megallama.cli train --gpus "$GPUS" "${ARGS[@]}" "$@" --dry-run
fi
exec torchrun --nproc_per_node "$GPUS" pretrain_llama.py "${ARGS[@]}" "$@"
