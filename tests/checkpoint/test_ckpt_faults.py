"""Fault handling in the loop: NaN/inf steps are skipped (and stop the run when they persist), SIGTERM saves the
current iteration and exits so the run resumes exactly, --keep-last prunes, a corrupt newest checkpoint falls back
to the newest good one."""
import math
import os
import signal

import pytest
import torch

import megallama.training as training
from megallama.arguments import parse_args
from megallama.checkpointing import open_checkpoint
from megallama.training import pretrain

from ckpt_helpers import TINY

BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4"]


def _run(argv):
    return pretrain(parse_args(BASE + argv, world_size=1))


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are poisoned."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _inject(monkeypatch, iterations, kind):
    """Wrap the loop's forward_step: at the given iterations poison the loss ('loss'), only the gradients
    ('grad'), or deliver SIGTERM ('sigterm') or SIGINT ('sigint') to this process."""
    orig = training.make_forward_step
    calls = {"n": 0}

    def make(args, device):
        fs = orig(args, device)

        def forward_step(data_iterator, model):
            out, loss_func = fs(data_iterator, model)
            calls["n"] += 1
            it = (calls["n"] - 1) // args.num_microbatches + 1
            if it in iterations:
                if kind == "loss":
                    out = out * float("nan")
                elif kind == "grad":
                    out = _NanGrad.apply(out)
                elif kind in ("sigterm", "sigint") and (calls["n"] - 1) % args.num_microbatches == 0:
                    os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
            return out, loss_func
        return forward_step
    monkeypatch.setattr(training, "make_forward_step", make)


def _tensors(path):
    _, common, reader = open_checkpoint(path)
    return {n: reader.read(n) for n in common["index"]}


@pytest.fixture(scope="module")
def reference():
    return _run(["--train-iters", "6"])["losses"]


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch, capsys, kind):
    _inject(monkeypatch, {3}, kind)
    ck = str(tmp_path / "ck")
    out = _run(["--train-iters", "5", "--save", ck, "--save-interval", "1"])
    log = capsys.readouterr().out
    assert "iteration 3: skipped (non-finite loss or gradient" in log
    assert "skipped iterations:   1" in log.splitlines()[-2] or "skipped iterations:   1" in log
    assert math.isnan(out["losses"][3]) == (kind == "loss")
    assert all(math.isfinite(out["losses"][i]) for i in (1, 2, 4, 5))
    # The skipped step changed nothing: weights and Adam moments after step 3 are those after step 2.
    before, after = _tensors(os.path.join(ck, "iter_0000002")), _tensors(os.path.join(ck, "iter_0000003"))
    assert sorted(before) == sorted(after) and any(n.startswith("optimizer/") for n in after)
    for n in before:
        assert torch.equal(before[n], after[n]), n
    later = _tensors(os.path.join(ck, "iter_0000004"))
    assert not torch.equal(later["model.norm.weight"], after["model.norm.weight"])  # training went on


def test_persistent_nans_stop_with_one_line(tmp_path, monkeypatch, capsys):
    import pretrain_llama
    _inject(monkeypatch, set(range(2, 10)), "loss")
    code = pretrain_llama.main(BASE + ["--train-iters", "8", "--max-skipped-iters", "3"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "3 iterations in a row" in lines[0] and "last at 4" in lines[0]


def test_sigterm_saves_current_iteration_and_resume_is_exact(tmp_path, monkeypatch, capsys, reference):
    ck = str(tmp_path / "ck")
    _inject(monkeypatch, {3}, "sigterm")
    out = _run(["--train-iters", "6", "--save", ck, "--save-interval", "100"])
    assert out["iteration"] == 3 and sorted(out["losses"]) == [1, 2, 3]
    assert "SIGTERM received" in capsys.readouterr().out
    assert sorted(os.listdir(ck)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]
    from megallama.checkpointing.signals import ExitSignalHandler
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), ExitSignalHandler)
    monkeypatch.undo()
    resumed = _run(["--train-iters", "6", "--load", ck])["losses"]
    assert sorted(resumed) == [4, 5, 6]
    for step in range(1, 7):
        got = out["losses"][step] if step <= 3 else resumed[step]
        assert got == reference[step], (step, got, reference[step])  # bit for bit


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, whatever pytest inherited: a shell starts a background job (`pytest &`) with
    SIGINT ignored, and so does every process it spawns; the signal would be lost and the run finish."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_is_one_line_exit_130_and_saves_nothing(tmp_path, monkeypatch, capsys, ctrl_c_raises):
    """SIGINT mid-iteration 3 (Megatron saves nothing on it): the last checkpoint stays iteration 2, no traceback."""
    import pretrain_llama
    ck = str(tmp_path / "ck")
    _inject(monkeypatch, {3}, "sigint")
    try:
        code = pretrain_llama.main(BASE + ["--train-iters", "6", "--save", ck, "--save-interval", "2"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt (a traceback for the user)")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == [f"interrupted after iteration 2; the last checkpoint is iteration 2 in {ck}"]
    assert sorted(os.listdir(ck)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    monkeypatch.undo()
    _inject(monkeypatch, {3}, "sigint")
    code = pretrain_llama.main(BASE + ["--train-iters", "6"])  # no --save: says so
    assert code == 130 and capsys.readouterr().err.strip() == "interrupted after iteration 2; nothing saved (no --save)"


def test_ctrl_c_of_a_real_process(tmp_path, ctrl_c_raises):
    """The signal from a terminal, to a running script: exit 130 and one line on stderr."""
    import subprocess
    from ckpt_helpers import command, env, wait_for_steps
    log = str(tmp_path / "loss.log")
    proc = subprocess.Popen(command(BASE + ["--train-iters", "1000", "--loss-log", log]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        assert wait_for_steps(log, 2, proc)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted after iteration "), err[-3000:]
    assert err.strip().endswith("nothing saved (no --save)")


def test_keep_last(tmp_path):
    ck = str(tmp_path / "ck")
    _run(["--train-iters", "5", "--save", ck, "--save-interval", "1", "--keep-last", "2"])
    assert sorted(os.listdir(ck)) == ["iter_0000004", "iter_0000005", "latest_checkpointed_iteration.txt"]


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, capsys, reference):
    ck = str(tmp_path / "ck")
    _run(["--train-iters", "6", "--exit-interval", "4", "--save", ck, "--save-interval", "2"])  # the resume's schedule
    bad = os.path.join(ck, "iter_0000004", "rank_00000.pt")
    with open(bad, "r+b") as f:  # flip one byte in the middle: same size, only the CRC can tell
        f.seek(os.path.getsize(bad) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    capsys.readouterr()
    resumed = _run(["--train-iters", "6", "--load", ck])["losses"]
    cap = capsys.readouterr()
    assert "skipping checkpoint" in cap.err and "iter_0000004" in cap.err and "CRC" in cap.err, cap.err
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == reference[step], step
