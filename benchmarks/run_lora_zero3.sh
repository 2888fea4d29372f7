#!/usr/bin/env bash
# LoRA under ZeRO-3 on GPUs: the frozen base sharded over dp (session 19) against one GPU and ZeRO-1 (base whole on
# every rank). Same model, data (mock, seeded) and global batch in each run; prints the loss lines and the peak
# memory line of each. Needs 2 GPUs. Env: STEPS (default 12), MODEL (default tiny_llama3_150m), MBS (micro-batch,
# default 2), RUNS (default "one_gpu zero1_dp2 zero3_dp2"), EXTRA (more flags for every run).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-12}
M=(--model "${MODEL:-tiny_llama3_150m}" --strategy lora --lora-rank 16 --bf16 --mock-data --seq-length 2048
   --micro-batch-size "${MBS:-2}" --global-batch-size 4 --train-iters "$STEPS" --lr 3e-4 --seed 11 --log-interval 3)
run() {  # name, launcher...
  local name=$1; shift
  [[ " ${RUNS:-one_gpu zero1_dp2 zero3_dp2} " == *" $name "* ]] || return 0
  "$@" "${M[@]}" ${EXTRA:-} > "$OUT/lora_$name.log" 2>&1 || echo "$name failed (rc $?)"
  echo "== $name"; grep -E "ZeRO-3|holds|iteration +[0-9]+/|memory" "$OUT/lora_$name.log" | cut -c1-400
}
run one_gpu python3 pretrain_llama.py
run zero1_dp2 torchrun --nproc_per_node 2 pretrain_llama.py --use-distributed-optimizer --zero-stage 1
run zero3_dp2 torchrun --nproc_per_node 2 pretrain_llama.py --use-distributed-optimizer --zero-stage 3
