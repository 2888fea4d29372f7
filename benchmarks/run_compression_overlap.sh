#!/usr/bin/env bash
# Gradient compression with the comm hook on a side stream (--overlap-grad-reduce) on 2 GPUs: the NCCL tests, then
# step time with and without overlap, over NVLink and over NCCL on TCP sockets (a slow link), all in one run so
# every row shares the machine. Logs under $OUT.   OUT=/tmp/out bash benchmarks/run_compression_overlap.sh
set -u
OUT=${OUT:-/tmp/compression_overlap}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
python3 -c "import torch; print(torch.__version__)" >> "$OUT/gpu.txt"
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
python3 -m pytest -q -p no:cacheprovider tests/multigpu/test_compression_nccl.py tests/compression/test_compression_gpu.py \
    2>&1 | tail -15 > "$OUT/tests.log"
for link in nvlink tcp; do
  env=()
  [ "$link" = tcp ] && env=(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1)
  for ov in "" "--overlap-grad-reduce"; do
    echo "== $link ${ov:-no-overlap}" >> "$OUT/step.log"
    env "${env[@]}" torchrun --nproc_per_node 2 benchmarks/bench_compression.py step $ov ${STEP_ARGS:-} \
        2>&1 | grep -v "^W\|OMP_NUM_THREADS\|^\*\*\*" >> "$OUT/step.log"
  done
done
