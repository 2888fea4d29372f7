#!/usr/bin/env bash
# Llama 3.1 405B (126 layers; rope scaling factor 8 over the original 8192 context comes from the registry's
# llama3_405b) in Megatron-core's layout: tp=8 + sequence parallel within a node, pp=8 across nodes with 8 virtual
# stages per rank (interleaved), the embedding and the loss each counted as one layer of the split (126 + 2 = 128 =
# 8 x 8 x 2: the first and last chunks hold 1 decoder layer, the others 2), ZeRO-1 over dp, full recompute, sequence
# 8192, the paper's schedule (peak lr 8e-5, 8000 warmup steps, cosine to 8e-7 over 1.2M steps; its first batches are
# 4M tokens = 512 sequences of 8192). One model replica is 8 x 8 = 64 GPUs: NNODES is a multiple of 8 (32 nodes: dp
# 4, about 64 GiB per GPU by our estimator; 16 nodes, dp 2, needs --zero-stage 2). Launch on every node, or through
# examples/slurm_pretrain.sbatch:
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=<host of rank 0> bash examples/pretrain_llama3_405b.sh
# DRY_RUN=1 resolves the flags for the whole job and prints the per-GPU memory estimate (one process, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-32}
ARGS=(--model llama3_405b --bf16 --tensor-model-parallel-size 8 --sequence-parallel
  --pipeline-model-parallel-size 8 --num-virtual-stages-per-pipeline-rank 8
  --account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split
  --zero-stage 1 --overlap-grad-reduce --recompute-granularity full
  --seq-length 8192 --micro-batch-size 1 --global-batch-size "${GBS:-512}"
  --train-iters "${ITERS:-1200000}" --lr 8e-5 --min-lr 8e-7 --lr-warmup-iters 8000
  --tokenizer-type llama3 --tokenizer-model "${TOKENIZER:-tokenizer.model}"
  --save "${SAVE:-checkpoints/llama3_405b}" --load "${SAVE:-checkpoints/llama3_405b}" --save-interval 500
  --log-interval 1)
if [ -n "${DRY_RUN:-}" ]; then
  exec python -m megallama.cli train --gpus 8 --nodes "$NNODES" "${ARGS[@]}" "$@" --dry-run
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node 8 \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  pretrain_llama.py "${ARGS[@]}" "$@"
