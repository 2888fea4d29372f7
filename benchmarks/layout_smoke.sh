#!/bin/bash
# Every parallel layout of pretrain_llama.py on 4 ranks, one after another: does each start, train and exit?
# (Equivalence is the tests' job; this catches what only real devices show, e.g. a hang at the first step.)
#   bash benchmarks/layout_smoke.sh cuda 40 OUTDIR --bf16      # 4 GPUs
#   bash benchmarks/layout_smoke.sh cpu 2 OUTDIR --num-layers 4  # 4 gloo ranks
# Prints one line per layout: its name, torchrun's exit code and its last log line; logs go to OUTDIR.
set -u
DEV=$1; IT=$2; OUT=$3; shift 3
COMMON="--model tiny_llama3_50m --device $DEV --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --train-iters $IT --lr 2e-3 --lr-warmup-iters 5 --log-interval 5 --no-progress-bar --eval-interval 100000 $*"
declare -A C
C[A_tp2sp_pp2_interleaved]="--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2 --num-layers 8 --num-layers-per-virtual-pipeline-stage 2"
C[0_dp4_baseline]=""
C[B_dp4_zero3_overlap]="--zero-stage 3 --overlap-grad-reduce --overlap-param-gather"
C[C_cp2_tp2]="--context-parallel-size 2 --tensor-model-parallel-size 2"
C[D_pp4_chimera]="--pipeline-model-parallel-size 4 --pipeline-schedule chimera --num-layers 8"
C[E_pp2_dp2_zbh1_zero1]="--pipeline-model-parallel-size 2 --pipeline-schedule zb-h1 --zero-stage 1 --overlap-grad-reduce"
C[F_dp4_powersgd_zero1]="--gradient-compression powersgd --zero-stage 1 --compression-warmup-steps 5"
C[G_dp4_moe_ep2]="--num-experts 8 --moe-router-topk 2 --expert-model-parallel-size 2"
port=29600
for k in $(echo "${!C[@]}" | tr ' ' '\n' | sort); do
  port=$((port+1))
  timeout ${SMOKE_TIMEOUT:-120} torchrun --nproc_per_node 4 --master_port $port pretrain_llama.py $COMMON ${C[$k]} > $OUT/$k.log 2>&1
  echo "$k rc=$? $(grep -E 'iteration|iter ' $OUT/$k.log | tail -1 | cut -c1-200)"
done
