#!/usr/bin/env bash
# Llama 3 8B on one node of 8 GPUs. LAYOUT=tp8 (default) or LAYOUT=3d (tp=2 x pp=2 x dp=2 with ZeRO-1).
# Extra flags pass through, e.g. --num-layers 8 for a reduced-depth check, --data-path my_corpus_text_document.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-8}
case "${LAYOUT:-tp8}" in
  tp8) PAR=(--tensor-model-parallel-size 8 --sequence-parallel) ;;
  3d)  PAR=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel --zero-stage 1) ;;
  *) echo "LAYOUT must be tp8 or 3d" >&2; exit 2 ;;
esac
torchrun --nproc_per_node "$NPROC" pretrain_llama.py --model llama3_8b --bf16 "${PAR[@]}" \
  --seq-length 8192 --micro-batch-size 1 --global-batch-size 32 --train-iters 50 --lr 3e-4 --lr-warmup-iters 5 \
  --tokenizer-type llama3 --tokenizer-model "${TOKENIZER:-tokenizer.model}" --log-interval 1 "$@"
