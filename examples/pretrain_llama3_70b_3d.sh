#!/usr/bin/env bash
# Llama 3 70B with 3D parallelism: tp=8 within a node, pp across nodes (PP=4, interleaved 4 x 5 layers), ZeRO-1
# over dp; sequence 8192, selective recompute. One replica is 32 GPUs (4 nodes), so the default 8 nodes give dp 2
# (about 55 GiB per GPU by our estimator); NNODES=4 runs one replica, dp 1 (about 68 GiB: ZeRO-1 then shards
# nothing). Launch on every node:
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<host of rank 0> bash examples/pretrain_llama3_70b_3d.sh
# DRY_RUN=1 resolves the flags for the whole job and prints the per-GPU memory estimate (one process, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-8}
ARGS=(--model llama3_70b --bf16 --tensor-model-parallel-size 8 --sequence-parallel
  --pipeline-model-parallel-size "${PP:-4}" --pipeline-schedule interleaved --num-layers-per-virtual-pipeline-stage 5
  --zero-stage 1 --overlap-grad-reduce --recompute-granularity selective
  --seq-length 8192 --micro-batch-size 1 --global-batch-size 256 --train-iters "${ITERS:-1000}"
  --tokenizer-type llama3 --tokenizer-model "${TOKENIZER:-tokenizer.model}")
if [ -n "${DRY_RUN:-}" ]; then
  exec python -m megallama.cli train --gpus 8 --nodes "$NNODES" "${ARGS[@]}" "$@" --dry-run
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node 8 \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  pretrain_llama.py "${ARGS[@]}" "$@"
