"""--grad-reduce-in-bf16 over NCCL (bf16 ``ReduceOp.AVG`` all-reduce / reduce-scatter, overlapped) on two GPUs,
with Megatron's --decoupled-lr on top: the first step's gradient norm (taken before any update, so only the
reduction differs) within 1e-2 relative of the fp32 reduction's, the following losses within 1e-2 (bf16 training
drifts a little from the different roundings); a skipped or doubled reduction misses the norm by far more (the CPU
twin, tests/optimizer/test_grad_reduce_bf16.py, measures both)."""
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..", ".."), os.path.join(_HERE, "..")]

from dist_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.multigpu

BASE = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "512", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-3",
        "--decoupled-lr", "5e-3", "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cuda",
        "--bf16", "--overlap-grad-reduce"]


def _run(rank, world, argv):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    out = pretrain(parse_args(list(argv), world_size=world))
    return out["losses"], out["grad_norms"]


@pytest.mark.parametrize("stage", ["0", "1", "3"])
def test_bf16_reduction_over_nccl_is_within_bf16_rounding(stage):
    argv = BASE + ["--zero-stage", stage]
    fp32, fp32_gn = run_distributed(_run, 2, argv, backend="nccl")[0]
    bf16, bf16_gn = run_distributed(_run, 2, argv + ["--grad-reduce-in-bf16"], backend="nccl")[0]
    assert abs(bf16_gn[1] - fp32_gn[1]) <= 1e-2 * fp32_gn[1], (bf16_gn, fp32_gn)
    assert bf16[1] == fp32[1]  # the forward before any update is the same
    for step in fp32:
        assert abs(bf16[step] - fp32[step]) <= 1e-2 * abs(fp32[step]), (step, bf16, fp32)
