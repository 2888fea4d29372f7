"""The real loop (``pretrain``) under parallel layouts equals the single-process run: same losses (fp32, 1e-5).

This is the integration proof that the process grid, TP/SP, the pipeline runner, DDP/ZeRO and the gradient
finalisation compose in the loop as users run it; the per-feature equivalence tests live beside each package.
"""
import pytest

from loop_harness import assert_layout_matches_single_process

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu"]


@pytest.mark.parametrize("world,extra", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--zero-stage", "2"]),
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
         "--pipeline-schedule", "interleaved", "--num-layers-per-virtual-pipeline-stage", "1"]),
    (4, ["--tensor-model-parallel-size", "2", "--zero-stage", "3"]),
    (2, ["--context-parallel-size", "2"]),
    (4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--cp-comm-type", "a2a"]),
    (4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-h1", "--zero-stage", "1",
         "--overlap-grad-reduce", "--recompute-granularity", "full"]),
    (2, ["--zero-stage", "3", "--overlap-grad-reduce", "--overlap-param-gather", "--compile"]),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--compile"]),
    (2, ["--context-parallel-size", "2", "--cp-comm-type", "a2a", "--compile"]),
], ids=["tp2_sp", "pp2_1f1b_tied", "dp2_zero2", "tp2_pp2_interleaved", "tp2_dp2_zero3", "cp2_ring", "cp2_pp2_ulysses",
        "pp2_dp2_zbh1_zero1_overlap_recompute", "dp2_zero3_overlap_compile",
        "tp2_sp_compile", "cp2_ulysses_compile"])
def test_pretrain_layout_matches_single_process(world, extra):
    assert_layout_matches_single_process(TINY, world, extra)
