#!/usr/bin/env bash
# Issue 13's measurement on one GPU: build the extension, then megallama variants vs HF+compile and HF+Liger for
# tiny_llama3_150m (mbs 16) and the Llama-3.2-1B shape (mbs 8) at sequence 2048, all in one command.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/whl .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "wheel install failed"
  export PYTHONPATH=/tmp/whl${PYTHONPATH:+:$PYTHONPATH}
fi
TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || echo "build failed"
python3 -c "import megallama.ops as o; print('kernels:', o.kernel_source())" 2>&1 | tee -a "$OUT/bench.log"
STEPS=${STEPS:-15}
python3 tools/benchmark.py --model tiny_llama3_150m --batch-sizes 16 --seq-length 2048 --steps $STEPS --compare-hf --liger \
  --megallama-args="--compile" --megallama-args="--compile --params-dtype fp32" \
  --save-results "$OUT/bench_150m.json" 2>&1 | tee -a "$OUT/bench.log"
python3 tools/benchmark.py --model llama3_2_1b --batch-sizes 8 --seq-length 2048 --steps $STEPS --compare-hf --liger \
  --megallama-args="--compile" --megallama-args="--compile --params-dtype fp32" \
  --save-results "$OUT/bench_1b.json" 2>&1 | tee -a "$OUT/bench.log"
