"""``--fp8-format hybrid`` on two GPUs over NCCL equals one GPU. On CUDA each fp8 GEMM phase runs as a compiled graph
whose tensor-parallel amax reduction is a traced functional all-reduce (MAX), a path the CPU tests (eager, gloo)
never take. tp 2 with and without sequence parallelism quantises exactly as tp 1 (the MAX gives every rank the
whole tensor's scale); what differs is the bf16 rounding of the split GEMMs' sums, so the bound is bf16-level:
losses within 5e-3 relative and gradient norms within 2e-2 over 3 AdamW steps (a rank scaling by its own shard's
amax was off by ~1e-1 in the CPU test). Also ``--compile`` of the whole model at tp 2 + SP against eager. Both
recipes: tensorwise, and delayed (amax histories reduced over NCCL once per step; under --compile the autograd
Functions with their in-place amax records are traced by dynamo)."""
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..", ".."), os.path.join(_HERE, "..")]

from dist_utils import run_distributed  # noqa: E402
from test_compile_nccl import BASE, _losses  # noqa: E402

pytestmark = pytest.mark.multigpu

FP8 = BASE + ["--bf16", "--fp8-format", "hybrid", "--micro-batch-size", "4", "--global-batch-size", "4"]


def _close(got, ref, loss_tol=5e-3, norm_tol=2e-2):
    (losses, norms), (ref_losses, ref_norms) = got, ref
    for step in ref_losses:
        assert abs(losses[step] - ref_losses[step]) <= loss_tol * abs(ref_losses[step]), (step, losses, ref_losses)
        assert abs(norms[step] - ref_norms[step]) <= norm_tol * ref_norms[step], (step, norms, ref_norms)


RECIPES = {"tensorwise": ["--fp8-recipe", "tensorwise"],
           "delayed": ["--fp8-recipe", "delayed", "--fp8-amax-history-len", "4", "--fp8-amax-compute-algo", "max"]}


@pytest.fixture(scope="module")
def one_gpu():
    return {r: run_distributed(_losses, 1, FP8 + flags, backend="nccl")[0] for r, flags in RECIPES.items()}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("layout", [["--sequence-parallel"], []], ids=["tp2_sp", "tp2"])
def test_fp8_tp2_equals_one_gpu(one_gpu, layout, recipe):
    argv = FP8 + RECIPES[recipe] + ["--tensor-model-parallel-size", "2"] + layout
    _close(run_distributed(_losses, 2, argv, backend="nccl")[0], one_gpu[recipe])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp8_tp2_sp_compiled_equals_eager(recipe):
    argv = FP8 + RECIPES[recipe] + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    eager = run_distributed(_losses, 2, argv, backend="nccl")[0]
    _close(run_distributed(_losses, 2, argv + ["--compile"], backend="nccl")[0], eager)
