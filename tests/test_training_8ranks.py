"""Issue 15's layouts on 8 CPU ranks through the real loop: tp=8, and tp=2 x pp=2 x dp=2 with ZeRO-1, each equal
to the single-process run (fp32 losses within 1e-5 relative)."""
import pytest

from loop_harness import assert_layout_matches_single_process

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "8", "--num-query-groups", "8", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu"]


@pytest.mark.parametrize("extra", [
    ["--tensor-model-parallel-size", "8", "--sequence-parallel"],
    ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
], ids=["tp8_sp", "tp2_pp2_dp2_zero1"])
def test_eight_rank_layouts_match_single_process(extra):
    assert_layout_matches_single_process(TINY, 8, extra, same_steps=False)
