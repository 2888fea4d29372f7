#!/usr/bin/env bash
# The tiny model on the bundled corpus, on CPU (a laptop is enough): the README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
python pretrain_llama.py --model tiny_llama3_50m --device cpu \
  --seq-length 128 --micro-batch-size 16 --global-batch-size 16 --train-iters 200 \
  --lr 2e-3 --lr-warmup-iters 20 --eval-interval 150 \
  --tensorboard-dir runs/tiny --save checkpoints/tiny --save-interval 150 "$@"
