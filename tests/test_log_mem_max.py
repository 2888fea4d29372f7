"""The log line's memory field is the largest peak of all ranks (the last rank prints it, under 1F1B usually not
the fullest), labelled so; one all-reduce of a float, and none when the field is off (CPU)."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megallama.logging import MEM_FIELD, format_log_line, max_over_ranks


def _ranks(rank, world):
    peak = [3.5, 9.25, 1.0][rank]  # stage 1 holds the most, the last rank the least
    calls = []
    orig = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        got = max_over_ranks(peak, torch.device("cpu"))
        off = max_over_ranks(None, torch.device("cpu"))
    finally:
        dist.all_reduce = orig
    return got, off, len(calls)


def test_max_over_ranks_with_gloo():
    out = run_distributed(_ranks, 3, timeout=120)
    assert out == {r: (9.25, None, 1) for r in range(3)}  # one collective, only for a value


def test_the_label_says_max():
    line = format_log_line(5, 10, {MEM_FIELD: 9.25})
    assert "| mem GiB (max over ranks): 9.25 |" in line
    assert max_over_ranks(2.0, torch.device("cpu")) == 2.0  # no process group: the value itself


def test_the_loop_reduces_at_log_steps_only(tmp_path, capsys, monkeypatch):
    """6 steps, --log-interval 3: two lines, two calls; CPU passes None, so no collective and no field."""
    import megallama.training as training
    from test_tensorboard import _run
    seen = []
    monkeypatch.setattr(training, "max_over_ranks", lambda v, device: (seen.append(v), v)[1])
    _run(tmp_path / "tb", ["--log-interval", "3", "--eval-interval", "0"])
    assert seen == [None, None]
    assert "mem GiB" not in capsys.readouterr().out
