"""A run killed with SIGKILL at a random step and resumed from its last checkpoint gives the per-step losses of
an uninterrupted run bit for bit (CPU, gloo), for the standard layout, tp=2, pp=2 and ZeRO-2. Under torchrun,
SIGTERM to the launcher makes every rank save the same iteration and exit; that resume is exact too."""
import random
import signal

import pytest

from ckpt_helpers import TINY, kill_tree, losses, run, start, wait_for_steps

T = 10
LAYOUTS = {"standard": (1, []),
           "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights"]),
           "zero2": (2, ["--zero-stage", "2"])}


def _interrupt_and_resume(tmp_path, argv, nproc, ref, sig, tag):
    stop_at = random.Random().randint(2, T - 4)  # leaves steps to do even if the kill lands late
    ck, log = str(tmp_path / f"{tag}_ck"), str(tmp_path / f"{tag}.log")
    interval = "1" if sig == signal.SIGKILL else "100"  # SIGTERM: the handler alone must save
    proc = start(argv + ["--save", ck, "--save-interval", interval, "--loss-log", log], nproc,
                 log=str(tmp_path / f"{tag}.out"))
    try:
        reached = wait_for_steps(log, stop_at, proc)
        if sig == signal.SIGTERM:
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it to the ranks
            proc.wait(timeout=120)
    finally:
        kill_tree(proc)  # SIGKILL the launcher and every rank, wherever they are (even mid-save)
    assert reached, open(tmp_path / f"{tag}.out").read()[-3000:]
    first_run = losses(log)
    if sig == signal.SIGTERM:
        assert "SIGTERM received" in open(tmp_path / f"{tag}.out").read()

    res_log = str(tmp_path / f"{tag}_resumed.log")
    r = run(argv + ["--load", ck, "--save", ck, "--save-interval", "1", "--loss-log", res_log], nproc)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = losses(res_log)
    assert resumed, (stop_at, sorted(first_run), r.stdout[-2000:])
    first = min(resumed)
    assert 2 <= first <= max(first_run) + 1 and max(resumed) == T, (stop_at, sorted(first_run), sorted(resumed))
    if sig == signal.SIGTERM:  # saved exactly the iteration it stopped at
        assert first == max(first_run) + 1
    assert f"at iteration {first - 1}" in r.stdout
    for step, loss in list(first_run.items()) + list(resumed.items()):
        assert loss == ref[step], (tag, stop_at, step, loss, ref[step])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_then_resume_is_bit_exact(tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    argv = TINY + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(T)] + extra
    ref_log = str(tmp_path / "ref.log")
    r = run(argv + ["--loss-log", ref_log], nproc)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = losses(ref_log)
    assert sorted(ref) == list(range(1, T + 1))
    _interrupt_and_resume(tmp_path, argv, nproc, ref, signal.SIGKILL, "killed")
    if layout == "tp2":
        _interrupt_and_resume(tmp_path, argv, nproc, ref, signal.SIGTERM, "terminated")
