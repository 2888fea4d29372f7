#!/usr/bin/env bash
# Any model on several nodes: set NNODES, NODE_RANK, MASTER_ADDR on each node; extra flags pass through.
# DRY_RUN=1 resolves the flags for the whole job and prints the per-GPU memory estimate (one process, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ -n "${DRY_RUN:-}" ]; then
  exec python -m megallama.cli train --gpus "$GPUS_PER_NODE" --nodes "$NNODES" --bf16 "$@" --dry-run
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  pretrain_llama.py --bf16 "$@"
