#!/usr/bin/env bash
# Any model on several nodes: set NNODES, NODE_RANK, MASTER_ADDR on each node; extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
torchrun --nnodes "${NNODES:-2}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  pretrain_llama.py --bf16 "$@"
