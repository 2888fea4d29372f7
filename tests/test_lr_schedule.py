"""The LR schedule (Megatron's styles and flags) and the loop's run control around it: skipped updates do not
advance the schedule, the log line's loss is the interval's mean, validation runs once more at the end of training,
and --exit-duration-in-mins saves and stops a run that resumes exactly."""
import math
import re

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.lr_scheduler import OptimizerParamScheduler
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "3e-3", "--no-progress-bar", "--device", "cpu"]
MOCK = TINY + ["--mock-data", "--vocab-size", "256"]


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": None}]


def _lrs(n, **kw):
    s = OptimizerParamScheduler(_Opt(), **kw)
    return [s.get_lr(i) for i in range(n)]


def _sched(argv):
    args = parse_args(TINY + argv, world_size=1)
    return OptimizerParamScheduler.from_args(_Opt(), args)


@pytest.mark.parametrize("style,mid", [("linear", 0.5), ("cosine", 0.5), ("exponential", math.sqrt(2) - 1),
                                       ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd_holds_the_peak_then_anneals_in_the_last_iterations(style, mid):
    """WSD with 2 warmup, 20 decay iterations, the last 8 annealing: each shape's coefficient at half the anneal."""
    lr = _lrs(24, max_lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=20, decay_style="WSD", wsd_decay_iters=8,
              wsd_decay_style=style)
    assert lr[:2] == [0.5, 1.0]
    assert lr[2:12] == [1.0] * 10  # stable until iteration 20 - 8
    assert lr[16] == pytest.approx(0.1 + 0.9 * mid)
    assert all(a >= b for a, b in zip(lr[12:], lr[13:])) and lr[12] == pytest.approx(1.0)
    assert lr[20:] == [0.1] * 4


def test_inverse_square_root_and_warmup_init_and_fraction():
    lr = _lrs(12, max_lr=1.0, min_lr=0.3, warmup_iters=4, decay_iters=10, decay_style="inverse-square-root",
              init_lr=0.2)
    assert lr[:4] == pytest.approx([0.4, 0.6, 0.8, 1.0])  # warmup from --lr-warmup-init
    assert lr[4] == pytest.approx(1.0) and lr[8] == pytest.approx(math.sqrt(0.5))
    assert lr[9] == pytest.approx(max(0.3, 2 / 3)) and lr[10] == pytest.approx(max(0.3, math.sqrt(0.4)))
    assert lr[11] == 0.3  # min after the decay iterations (Megatron's: at their end, still the formula's)
    s = _sched(["--train-iters", "50", "--lr-decay-iters", "40", "--lr-warmup-fraction", "0.25"])
    assert (s.warmup_iters, s.decay_iters) == (10, 40)  # Megatron: a fraction of the decay iterations
    s = _sched(["--train-iters", "50", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5",
                "--lr-wsd-decay-style", "linear"])
    assert (s.decay_style, s.wsd_decay_iters, s.wsd_decay_style, s.get_lr(44), s.get_lr(50)) == \
        ("WSD", 5, "linear", 3e-3, pytest.approx(3e-4))


@pytest.mark.parametrize("argv,says", [
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "--lr-warmup-fraction and --lr-warmup-iters both"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction 1.5 is not in [0, 1]"),
    (["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-wsd-decay-iters", "5"], "--lr-wsd-decay-iters applies to --lr-decay-style WSD, not cosine"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be positive, got 0"),
])
def test_schedule_flag_mistakes_are_one_line(argv, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_args(TINY + argv, world_size=1)


def test_wsd_anneal_or_warmup_longer_than_the_schedule_is_refused():
    with pytest.raises(ConfigError, match=r"--lr-wsd-decay-iters 48 is longer than the iterations after warmup"):
        _sched(["--train-iters", "50", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "48"])
    with pytest.raises(ConfigError, match=re.escape("the LR warmup (5 iterations) is longer than the decay (1, ")):
        _sched(["--train-iters", "6", "--lr-warmup-iters", "5", "--lr-decay-iters", "1"])
    equal = _sched(["--train-iters", "6", "--lr-warmup-iters", "6"])  # warmup, the peak at its end, then --min-lr
    assert (equal.get_lr(5), equal.get_lr(6), equal.get_lr(7)) == (3e-3, 3e-3, pytest.approx(3e-4))
    assert _sched(["--train-iters", "3", "--lr-warmup-iters", "5", "--lr-decay-style", "constant"]).get_lr(9) == 3e-3


def test_a_skipped_update_does_not_advance_the_schedule_and_the_count_resumes(tmp_path, monkeypatch):
    """Iteration 2's update is skipped (as an fp16 overflow would be): iteration 3 gets the LR iteration 2 had, and
    a resume from a checkpoint after the skip keeps that offset (Megatron's scheduler counts applied updates)."""
    import megallama.training as tr
    setup, seen = tr.setup_model_and_optimizer, []

    def with_a_skip(args, device):
        chunks, opt = setup(args, device)
        step = opt.step

        def maybe_skip():
            seen.append(opt.param_groups[0]["lr"])
            return (False, None, None) if len(seen) == 2 else step()
        opt.step = maybe_skip
        return chunks, opt
    monkeypatch.setattr(tr, "setup_model_and_optimizer", with_a_skip)
    argv = MOCK + ["--train-iters", "6", "--lr-warmup-iters", "4", "--lr-decay-style", "linear"]
    ck = str(tmp_path / "ck")
    pretrain(parse_args(argv + ["--save", ck, "--save-interval", "3", "--exit-interval", "3"], world_size=1))
    resumed = pretrain(parse_args(argv + ["--load", ck], world_size=1))
    ref = _lrs(6, max_lr=3e-3, min_lr=3e-4, warmup_iters=4, decay_iters=6, decay_style="linear")
    assert resumed["iteration"] == 6
    assert seen == pytest.approx([ref[0], ref[1], ref[1], ref[2], ref[3], ref[4]])


def test_log_line_loss_is_the_interval_mean_and_validation_runs_at_the_end(capsys):
    out = pretrain(parse_args(MOCK + ["--train-iters", "7", "--log-interval", "3", "--eval-interval", "3",
                                      "--eval-iters", "1"], world_size=1))
    text = capsys.readouterr().out
    logged = {int(i): float(v) for i, v in re.findall(r"iteration\s+(\d+)/\s*7 \|.*?\| lm loss: ([0-9.E+-]+) \|", text)}
    h = out["losses"]
    assert sorted(logged) == [3, 6, 7]
    for step, first in ((3, 1), (6, 4), (7, 7)):
        mean = sum(h[s] for s in range(first, step + 1)) / (step - first + 1)
        assert logged[step] == pytest.approx(mean, rel=1e-5), (step, logged[step], mean)
    assert logged[6] != pytest.approx(h[6], rel=1e-5)  # the mean, not the interval's last loss
    assert sorted(out["valid_losses"]) == [3, 6, 7]  # every 3, and once more at the end
    assert "validation loss at iteration 7 on validation set" in text
    again = pretrain(parse_args(MOCK + ["--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1"],
                                world_size=1))
    assert sorted(again["valid_losses"]) == [3, 6]  # the last iteration was evaluated already: not twice


def test_exit_duration_saves_stops_and_the_run_resumes_exactly(tmp_path, capsys):
    argv = MOCK + ["--train-iters", "5"]
    full = pretrain(parse_args(argv, world_size=1))["losses"]
    ck = str(tmp_path / "ck")
    first = pretrain(parse_args(argv + ["--save", ck, "--load", ck, "--exit-duration-in-mins", "1e-9"],
                                world_size=1))
    assert first["iteration"] == 1 and sorted(first["losses"]) == [1]
    assert "--exit-duration-in-mins 1e-09 reached after" in capsys.readouterr().out
    rest = pretrain(parse_args(argv + ["--save", ck, "--load", ck], world_size=1))["losses"]
    assert sorted(rest) == [2, 3, 4, 5]
    assert all(rest[s] == full[s] for s in rest), (rest, full)


def test_exit_interval_stops_at_each_multiple_so_relaunches_go_on(tmp_path):
    """Megatron's --exit-interval N: stop (and save) at the next multiple of N; the same command relaunched with
    --load trains N more (it was an absolute iteration, so a relaunch loop trained nothing)."""
    ck = str(tmp_path / "ck")
    argv = MOCK + ["--train-iters", "7", "--save", ck, "--load", ck, "--exit-interval", "3"]
    stops = [pretrain(parse_args(argv, world_size=1))["iteration"] for _ in range(3)]
    assert stops == [3, 6, 7]


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_schedule_is_megatrons(style, monkeypatch):
    """--weight-decay-incr-style: Megatron's formula over --train-iters, on the decaying group only (norms and other
    1-D parameters keep 0), and unchanged weight decay without it."""
    s = _sched(["--train-iters", "10", "--weight-decay-incr-style", style, "--start-weight-decay", "0.0",
                "--end-weight-decay", "0.2"])
    for i, r in ((0, 0.0), (5, 0.5), (8, 0.8)):
        coeff = r if style == "linear" else 0.5 * (math.cos(math.pi * (1 - r)) + 1)
        assert s.get_wd(i) == pytest.approx(0.2 * coeff)
    assert s.get_wd(10) == s.get_wd(50) == 0.2
    import megallama.training as tr
    setup, seen = tr.setup_model_and_optimizer, []

    def spy(args, device):
        chunks, opt = setup(args, device)
        step = opt.step

        def record():
            seen.append([(g["weight_decay"], len(g["params"])) for g in opt.param_groups])
            return step()
        opt.step = record
        return chunks, opt
    monkeypatch.setattr(tr, "setup_model_and_optimizer", spy)
    pretrain(parse_args(MOCK + ["--train-iters", "4", "--weight-decay-incr-style", style, "--start-weight-decay",
                                "0.1", "--end-weight-decay", "0.3"], world_size=1))
    ref = OptimizerParamScheduler(_Opt(), 3e-3, 3e-4, 0, 4, start_wd=0.1, end_wd=0.3, wd_incr_iters=4,
                                  wd_incr_style=style)
    assert [g[0][0] for g in seen] == pytest.approx([ref.get_wd(i) for i in range(4)])
    assert all(g[1][0] == 0.0 for g in seen) and seen[0][1][1] > 0  # the no-decay group
    seen.clear()
    pretrain(parse_args(MOCK + ["--train-iters", "2", "--weight-decay", "0.05"], world_size=1))
    assert [g[0][0] for g in seen] == [0.05, 0.05]


@pytest.mark.parametrize("argv,says", [
    (["--weight-decay-incr-style", "linear"], "needs --start-weight-decay and --end-weight-decay"),
    (["--start-weight-decay", "0.1", "--end-weight-decay", "0.2"], "need --weight-decay-incr-style linear or cosine"),
    (["--weight-decay-incr-style", "cosine", "--start-weight-decay", "-1", "--end-weight-decay", "0.2"],
     "weight decay must be >= 0"),
])
def test_weight_decay_schedule_errors(argv, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_args(TINY + ["--train-iters", "10"] + argv, world_size=1)
