"""Validation reads on (Megatron's consumed_valid_samples): each evaluation takes the next --eval-iters global
batches, a resumed run continues after the ones read before the save, and the test set is read from its start.
--num-workers reads the same batches through DataLoader workers."""
from recorded_data import Recorded

N = 64  # validation samples: room for 4 evaluations of 2 x 4 without wrapping


ARGV = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-2", "--no-progress-bar", "--device", "cpu",
        "--no-fused-kernels", "--eval-interval", "2", "--eval-iters", "2"]


def _run(extra, log):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    return pretrain(parse_args(ARGV + extra, world_size=1),
                    datasets=(Recorded(40, 0, None), Recorded(N, 1, log)))


def test_each_evaluation_reads_the_next_batches_and_a_resume_goes_on(tmp_path):
    log = []
    whole = _run([], log)
    assert log == list(range(24))  # evaluations at 2, 4 and 6: 8 samples each, in order
    assert sorted(whole["valid_losses"]) == [2, 4, 6] and len(set(whole["valid_losses"].values())) == 3
    log = []
    run = ["--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck")]
    first = _run(run + ["--exit-interval", "4"], log)
    assert first["iteration"] == 4 and log == list(range(16))
    log = []
    second = _run(run, log)
    assert log == list(range(16, 24))
    assert second["valid_losses"][6] == whole["valid_losses"][6]


def test_workers_read_the_same_batches():
    plain = _run([], None)
    workers = _run(["--num-workers", "2"], None)
    assert workers["losses"] == plain["losses"] and workers["valid_losses"] == plain["valid_losses"]


def test_a_validation_set_smaller_than_the_run_is_read_from_its_start_each_time():
    """A user's validation set is not sized for the run: continuing through it would wrap into other, partly
    repeated subsets, so each evaluation reads it from the start and the losses stay comparable."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    log = []
    pretrain(parse_args(ARGV, world_size=1), datasets=(Recorded(40, 0, None), Recorded(12, 1, log)))
    assert log == list(range(8)) * 3
