#!/usr/bin/env bash
# Issue 13's measurement on one GPU, in one command: build the extension (while the fused-head CUDA test runs on
# the GPU), then megallama vs HF+compile and HF+Liger for tiny_llama3_150m (mbs 16) and the Llama-3.2-1B shape
# (mbs 8) at sequence 2048. megallama's last step runs under --profile-step; its top-10 kernel table lands in
# $OUT/workers_*.log. Env: STEPS (timed steps, default 15), VARIANTS (megallama flag sets, ';'-separated), SHAPES
# (which of "150m 1b" to run, default both).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/whl .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "wheel install failed"
  export PYTHONPATH=/tmp/whl${PYTHONPATH:+:$PYTHONPATH}
fi
STEPS=${STEPS:-15}
# The device image's CXX (/opt/gcc/bin/g++, a wrapper) links libstdc++ statically into the extension, and a C++
# error from it then crashes the process instead of raising: build with the system compiler there.
if [[ "${CXX:-}" == /opt/gcc/* && -x /usr/bin/g++ ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 &
BUILD=$!
python3 -m pytest -q -s -p no:cacheprovider tests/model/test_fused_head_gpu.py 2>&1 | tail -4 | tee -a "$OUT/bench.log"
wait $BUILD || echo "build failed" | tee -a "$OUT/bench.log"
python3 -c "import megallama.ops as o; print('kernels:', o.kernel_source())" 2>&1 | tee -a "$OUT/bench.log"
IFS=';' read -ra VARS <<< "${VARIANTS:---compile --profile-step $((STEPS + 5))}"
MARGS=(); for v in "${VARS[@]}"; do MARGS+=("--megallama-args=$v"); done
for spec in "tiny_llama3_150m 16 150m" "llama3_2_1b 8 1b"; do
  set -- $spec
  [[ " ${SHAPES:-150m 1b} " == *" $3 "* ]] || continue
  python3 tools/benchmark.py --model "$1" --batch-sizes "$2" --seq-length 2048 --steps "$STEPS" --compare-hf --liger \
    "${MARGS[@]}" --save-results "$OUT/bench_$3.json" --worker-log "$OUT/workers_$3.log" 2>&1 | tee -a "$OUT/bench.log"
  grep -A13 "^profile of iteration" "$OUT/workers_$3.log" | tee -a "$OUT/bench.log"
done
