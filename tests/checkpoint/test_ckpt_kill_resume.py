"""A run killed with SIGKILL at a random step and resumed from its last checkpoint gives the per-step losses of
an uninterrupted run bit for bit (CPU, gloo), for the standard layout, tp=2, pp=2 and ZeRO-2."""
import os
import random

import pytest

from ckpt_helpers import TINY, kill_tree, losses, run, start, wait_for_steps

T = 8
LAYOUTS = {"standard": (1, []),
           "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights"]),
           "zero2": (2, ["--zero-stage", "2"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_then_resume_is_bit_exact(tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    argv = TINY + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(T)] + extra
    ref_log = str(tmp_path / "ref.log")
    r = run(argv + ["--loss-log", ref_log], nproc)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = losses(ref_log)
    assert sorted(ref) == list(range(1, T + 1))

    kill_at = random.Random().randint(2, T - 2)
    ck, log = str(tmp_path / "ck"), str(tmp_path / "killed.log")
    proc = start(argv + ["--save", ck, "--save-interval", "1", "--loss-log", log], nproc,
                 log=str(tmp_path / "killed.out"))
    try:
        reached = wait_for_steps(log, kill_at, proc)
    finally:
        kill_tree(proc)  # SIGKILL the launcher and every rank, wherever they are (even mid-save)
    assert reached, open(tmp_path / "killed.out").read()[-3000:]
    killed = losses(log)

    res_log = str(tmp_path / "resumed.log")
    r = run(argv + ["--load", ck, "--save", ck, "--save-interval", "1", "--loss-log", res_log], nproc)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = losses(res_log)
    assert resumed, (kill_at, sorted(killed), sorted(os.listdir(ck)), r.stdout[-3000:])
    first = min(resumed)
    assert 2 <= first <= max(killed) + 1 and max(resumed) == T, (kill_at, sorted(killed), sorted(resumed))
    assert f"at iteration {first - 1}" in r.stdout
    for step, loss in list(killed.items()) + list(resumed.items()):
        assert loss == ref[step], (layout, kill_at, step, loss, ref[step])
