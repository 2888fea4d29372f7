#!/usr/bin/env bash
# Llama 3 8B on one node of 8 GPUs, sequence 8192. LAYOUT=tp8 (default; about 24 GiB per GPU by our estimator) or
# LAYOUT=3d (tp=2 x pp=2 x dp=2 with ZeRO-1; about 43 GiB).
# Extra flags pass through, e.g. --num-layers 8 for a reduced-depth check, --data-path my_corpus_text_document.
# DRY_RUN=1 resolves the flags for NPROC GPUs and prints the per-GPU memory estimate (one process, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-8}
case "${LAYOUT:-tp8}" in
  tp8) PAR=(--tensor-model-parallel-size 8 --sequence-parallel) ;;
  3d)  PAR=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel --zero-stage 1) ;;
  *) echo "LAYOUT must be tp8 or 3d" >&2; exit 2 ;;
esac
ARGS=(--model llama3_8b --bf16 "${PAR[@]}"
  --seq-length 8192 --micro-batch-size 1 --global-batch-size 32 --train-iters 50 --lr 3e-4 --lr-warmup-iters 5
  --tokenizer-type llama3 --tokenizer-model "${TOKENIZER:-tokenizer.model}" --log-interval 1)
if [ -n "${DRY_RUN:-}" ]; then
  exec python -m megallama.cli train --gpus "$NPROC" "${ARGS[@]}" "$@" --dry-run
fi
exec torchrun --nproc_per_node "$NPROC" pretrain_llama.py "${ARGS[@]}" "$@"
