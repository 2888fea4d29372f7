"""examples/: the launchers' flags resolve and fit (their DRY_RUN mode: one process, no GPU), and every Python
example trains its tiny CPU override on the bundled data (a subprocess each, as a user runs them)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(key, None)
    return {**env, **extra}


def _bash(script, timeout=120, **env):
    return subprocess.run(["bash", os.path.join(REPO, "examples", script)], capture_output=True, text=True,
                          cwd=REPO, env=_env(**env), timeout=timeout)


def _total_gib(stdout):
    return float(re.search(r"^total\s+([0-9.]+)\s+per GPU", stdout, re.M).group(1))


def test_405b_launcher_resolves_and_fits_80_gib():
    r = _bash("pretrain_llama3_405b.sh", DRY_RUN="1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "224 GPUs = tp 8 x pp 14 x dp 2" in r.stdout and "ZeRO-1" in r.stdout and "recompute full" in r.stdout
    assert "'rope_scaling': {'factor': 8.0" in r.stdout and _total_gib(r.stdout) < 0.95 * 80
    bad = _bash("pretrain_llama3_405b.sh", DRY_RUN="1", NNODES="32")  # 256 GPUs hold no whole 112-GPU replica
    assert bad.returncode == 2 and "not divisible by tp*pp*cp = 8*14*1" in bad.stderr, bad.stderr[-2000:]


def test_slurm_script_takes_the_rendezvous_from_slurm():
    r = _bash("slurm_pretrain.sbatch", DRY_RUN="1", SLURM_JOB_NUM_NODES="56", SLURM_JOB_ID="4242")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"world_size\s+448", r.stdout) and "448 GPUs = tp 8 x pp 14 x dp 4" in r.stdout
    assert _total_gib(r.stdout) < _total_gib(_bash("pretrain_llama3_405b.sh", DRY_RUN="1").stdout)  # ZeRO-1 over 4
    outside = _bash("slurm_pretrain.sbatch")
    assert outside.returncode != 0 and "run through sbatch" in outside.stderr
