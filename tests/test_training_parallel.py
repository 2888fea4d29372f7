"""The real loop (``pretrain``) under parallel layouts equals the single-process run: same losses (fp32, 1e-5).

This is the integration proof that the process grid, TP/SP, the pipeline runner, DDP/ZeRO and the gradient
finalisation compose in the loop as users run it; the per-feature equivalence tests live beside each package.
"""
import pytest

from dist_utils import run_distributed
from megallama.arguments import parse_args
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu"]


def _train(rank, world, extra):
    return pretrain(parse_args(TINY + extra, world_size=world))["losses"]


_REF = {}


def _reference():
    if "ref" not in _REF:
        _REF["ref"] = run_distributed(_train, 1, [])[0]
    return _REF["ref"]


@pytest.mark.parametrize("world,extra", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--zero-stage", "2"]),
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
         "--pipeline-schedule", "interleaved", "--num-layers-per-virtual-pipeline-stage", "1"]),
    (4, ["--tensor-model-parallel-size", "2", "--zero-stage", "3"]),
    (2, ["--context-parallel-size", "2"]),
    (4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--cp-comm-type", "a2a"]),
], ids=["tp2_sp", "pp2_1f1b_tied", "dp2_zero2", "tp2_pp2_interleaved", "tp2_dp2_zero3", "cp2_ring", "cp2_pp2_ulysses"])
def test_pretrain_layout_matches_single_process(world, extra):
    ref = _reference()
    out = run_distributed(_train, world, extra)
    for rank, losses in out.items():
        assert sorted(losses) == sorted(ref)
        for step in ref:
            assert abs(losses[step] - ref[step]) <= 1e-5 * abs(ref[step]), (rank, step, losses[step], ref[step])
