"""Strategies in the real loop under 3D layouts + ZeRO equal the single-process run (fp32 losses, 1e-5):
hybrid (MoE + LoRA: aux losses on every pipeline stage, frozen base outside the DDP buffers) under tp x pp with
sequence parallelism, under dp with ZeRO-2, and with experts split over ep = 2 (all-to-all, expert grads over the
expert-data-parallel group) x tp 2 with SP and ZeRO-1.

The MoE aux loss is Megatron's ``aux_loss``, one per micro-batch (statistics reduced only over the ranks that split
its tokens), so every layout runs the reference's --micro-batch-size and global batch."""
import pytest

from loop_harness import assert_layout_matches_single_process

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "128", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels",
        "--strategy", "hybrid", "--num-experts", "4", "--moe-layers", "1,2", "--moe-z-loss-coeff", "1e-3",
        "--lora-rank", "4", "--lora-target-modules", "q_proj,v_proj,o_proj,gate_proj,down_proj"]


@pytest.mark.parametrize("world,extra", [
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--zero-stage", "2"]),
    (4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
         "--zero-stage", "1"]),
], ids=["hybrid_tp2_pp2_sp", "hybrid_dp2_zero2", "hybrid_ep2_tp2_sp_zero1"])
def test_hybrid_strategy_layout_matches_single_process(world, extra):
    assert_layout_matches_single_process(TINY, world, extra)
