"""Checkpoints name decoder layers by their global index, so a run saved under uneven virtual stages resumes under
any other split: the training loop (pretrain_llama's path: flags -> derive_pipeline -> model chunks, grid, schedule)
trains "Ett|t|t|tttL" (pp 2, rank 0 holds [2, 1], rank 1 [1, 3]) to step 6, saving step 3; resumed from step 3 on
one process, and under Megatron's --account-for-embedding-in-pipeline-split with 2 virtual stages ([1, 2 | 2, 2]),
steps 4-6 give the straight run's losses within 1e-5 relative. The straight run itself equals one process."""
import os

from dist_utils import run_distributed
from loop_harness import train_losses

ARGS = ["--num-layers", "7", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--lr", "3e-3",
        "--lr-warmup-iters", "1", "--no-progress-bar", "--device", "cpu", "--mock-data", "--no-fused-kernels",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6"]


def _close(got, ref, steps):
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def test_uneven_virtual_stages_save_and_resume_under_other_splits(tmp_path):
    ck = str(tmp_path / "ck")
    layout = ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Ett|t|t|tttL"]
    straight = run_distributed(train_losses, 2, ARGS + layout + ["--save", ck, "--save-interval", "3"])
    one = run_distributed(train_losses, 1, list(ARGS))[0]
    for losses in straight.values():
        _close(losses, one, range(1, 7))
    load = ["--load", os.path.join(ck, "iter_0000003")]
    _close(run_distributed(train_losses, 1, ARGS + load)[0], one, range(4, 7))
    other = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
             "--account-for-embedding-in-pipeline-split"]
    for losses in run_distributed(train_losses, 2, ARGS + other + load).values():
        _close(losses, one, range(4, 7))
