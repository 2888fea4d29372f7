#!/usr/bin/env bash
# The tiny model on the bundled corpus, on CPU (a laptop is enough): the README's first command.
# --load = --save, as in Megatron's launchers: a second run resumes from the newest checkpoint; a --save DIR given
# to this script moves both (an explicit --load still wins: it comes later).
# DRY_RUN=1 resolves the flags and prints the memory estimate (as for one GPU) without training.
set -euo pipefail
cd "$(dirname "$0")/.."
SAVE=checkpoints/tiny
prev=
for arg in "$@"; do
  if [ "$prev" = --save ]; then SAVE=$arg; fi
  case "$arg" in --save=*) SAVE=${arg#--save=} ;; esac
  prev=$arg
done
ARGS=(--model tiny_llama3_50m --device cpu
  --seq-length 128 --micro-batch-size 16 --global-batch-size 16 --train-iters 200
  --lr 2e-3 --lr-warmup-iters 20 --eval-interval 150
  --tensorboard-dir runs/tiny --save "$SAVE" --load "$SAVE" --save-interval 150)
if [ -n "${DRY_RUN:-}" ]; then
  exec python -m megallama.cli train "${ARGS[@]}" "$@" --dry-run
fi
exec python pretrain_llama.py "${ARGS[@]}" "$@"
