"""--rampup-batch-size (Megatron's): the batch sizes and iteration count follow Megatron's calculator; a ramped
run reads the sample stream in order (its first small batches train exactly as a run at that batch); a resume
mid-ramp is exact; dp 2 and pp 2 train like one process; and the flag's contradictions are one line each."""
import re

import pytest

from dist_utils import run_distributed

from megallama.arguments import parse_args
from megallama.batch_rampup import BatchSizeRampup
from megallama.errors import ConfigError
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--lr", "1e-2", "--no-progress-bar", "--device", "cpu", "--mock-data"]
RAMP = TINY + ["--global-batch-size", "16", "--train-samples", "60", "--rampup-batch-size", "4", "4", "24"]


def test_calculator_is_megatrons():
    r = BatchSizeRampup(4, 4, 24, 16, 2)
    assert [r.global_batch(c) for c in (0, 7, 8, 15, 16, 23, 24, 25, 100)] == [4, 4, 8, 8, 12, 12, 16, 16, 16]
    assert r.num_microbatches(16) == 6 and r.batch_sizes() == [4, 8, 12, 16]
    # batches 4, 4, 8, 12 (28 samples, past the ramp's 24), then (60 - 28) // 16 = 2 more
    assert r.train_iters(60) == 6
    assert r.train_iters(20) == 3  # batches 4, 4, 8 (12 would pass 20 samples): Megatron's count; was 4
    assert parse_args(RAMP, world_size=1).train_iters == 6


def _run(argv, world=1, capsys=None):
    return pretrain(parse_args(argv, world_size=world))


def test_batches_grow_and_read_the_sample_stream_in_order(capsys):
    out = _run(RAMP + ["--lr-decay-style", "constant", "--lr-warmup-samples", "0"])
    log = capsys.readouterr().out
    sizes = [int(x) for x in re.findall(r"global batch size:\s+(\d+)", log)]
    consumed = [int(x) for x in re.findall(r"consumed samples:\s+(\d+)", log)]
    assert sizes == [4, 4, 8, 12, 16, 16] and consumed == [4, 8, 16, 28, 44, 60]
    const = _run(TINY + ["--global-batch-size", "4", "--train-iters", "2", "--lr-decay-style", "constant",
                         "--lr-warmup-iters", "0"])
    assert [out["losses"][1], out["losses"][2]] == [const["losses"][1], const["losses"][2]]


def test_per_token_loss_while_the_batch_ramps_up():
    """--calculate-per-token-loss (was refused with a ramp): each iteration is normalised by its own loss tokens."""
    corpus = [a for a in TINY if a not in ("--mock-data", "--vocab-size", "256")]  # the bundled data: it has eods
    flags = ["--lr-decay-style", "constant", "--calculate-per-token-loss", "--eod-mask-loss"]
    out = _run(corpus + RAMP[len(TINY):] + flags + ["--lr-warmup-samples", "0"])
    const = _run(corpus + flags + ["--global-batch-size", "4", "--train-iters", "2", "--lr-warmup-iters", "0"])
    assert [out["losses"][1], out["losses"][2]] == pytest.approx([const["losses"][1], const["losses"][2]], rel=1e-6)


def test_lr_follows_the_samples_consumed(monkeypatch):
    """Warmup of 32 samples and linear decay to 60: the LR of each update is the schedule at the samples consumed
    before it (Megatron's count), in global batches of 16, its warmup counting the update's own samples (so a batch
    of 4 warms up a quarter as much as one of 16); --lr-*-iters, which count iterations a ramp resizes, are
    refused."""
    from megallama.lr_scheduler import OptimizerParamScheduler
    seen = []
    real = OptimizerParamScheduler.step
    monkeypatch.setattr(OptimizerParamScheduler, "step",
                        lambda self, i, inc=1.0: seen.append(real(self, i, inc)) or seen[-1])
    _run(RAMP + ["--lr-warmup-samples", "32", "--lr-decay-style", "linear"])
    ref = OptimizerParamScheduler(None, 1e-2, 1e-3, 2.0, 60 / 16, "linear")
    before, batches = (0, 4, 8, 16, 28, 44), (4, 4, 8, 12, 16, 16)
    assert seen == pytest.approx([ref.get_lr(c / 16, increment=b / 16) for c, b in zip(before, batches)])
    assert seen[0] == pytest.approx(1e-2 * 4 / 32)
    with pytest.raises(ConfigError, match="--lr-decay-iters counts iterations"):
        parse_args(RAMP + ["--lr-decay-iters", "6"], world_size=1)
    with pytest.raises(ConfigError, match="--lr-warmup-iters counts iterations"):
        parse_args(RAMP + ["--lr-warmup-iters", "1"], world_size=1)


def test_weight_decay_spans_the_samples():
    """The weight-decay increment runs over the run's samples (Megatron's), not the ramp's larger iteration count."""
    from megallama.lr_scheduler import OptimizerParamScheduler
    a = parse_args(RAMP + ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0",
                           "--end-weight-decay", "1"], world_size=1)
    s = OptimizerParamScheduler.from_args(None, a)
    assert s.wd_incr_iters == pytest.approx(60 / 16) and s.get_wd(44 / 16) == pytest.approx(44 / 60)


def test_resume_mid_ramp_is_exact(tmp_path):
    whole = _run(RAMP)["losses"]
    ck = ["--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck")]
    first = _run(RAMP + ck + ["--exit-interval", "3"])["losses"]
    rest = _run(RAMP + ck)["losses"]
    assert sorted(first) == [1, 2, 3] and {**first, **rest} == whole


def _parallel(rank, world):
    from megallama.mpu import parallel_state as ps
    out = {}
    for name, flags in (("dp2", []), ("pp2", ["--pipeline-model-parallel-size", "2"])):
        out[name] = _run(RAMP + flags, world)["losses"]
        ps.destroy_model_parallel()
    return out


def test_dp2_and_pp2_train_like_one_process():
    ref = _run(RAMP)["losses"]
    out = run_distributed(_parallel, 2)[0]
    for name, losses in out.items():
        assert [losses[i] for i in range(1, 7)] == pytest.approx([ref[i] for i in range(1, 7)], rel=1e-5), name


@pytest.mark.parametrize("argv,says", [
    (TINY + ["--global-batch-size", "16", "--train-iters", "5", "--rampup-batch-size", "4", "4", "24"],
     "--rampup-batch-size needs sample-based training: give --train-samples"),
    (TINY + ["--global-batch-size", "16", "--train-samples", "60", "--rampup-batch-size", "4", "5", "24"],
     "minus the start must be a multiple of the increment"),
    (TINY + ["--global-batch-size", "16", "--train-samples", "60", "--rampup-batch-size", "3", "1", "24"],
     "the start 3 is not a multiple of micro-batch x data-parallel size 2"),
])
def test_contradictions_are_one_line(argv, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_args(argv, world_size=1)
