"""The pipeline's first step over NCCL, with nothing run before it, finishes (it used to hang).

NCCL connects a pair of ranks inside the first batch_isend_irecv between them, holding that CPU until the peer
joins; a peer held meanwhile by a device-wide synchronisation that waits on a receive posted ahead (the timed
runner's sync, or cuBLAS creating its handle at autograd's first backward) never joins. ``warm_up_group`` now
connects every pair a schedule uses before its first message. This runs the bench's timed path on fresh processes
(``--skip-check`` leaves no earlier step to connect the pairs): before that, this configuration hung on 2 H200s
and the bench's default one on 2 and 4 H100s.
"""
import os
import subprocess
import sys

import pytest

from dist_utils import free_port

pytestmark = pytest.mark.multigpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_first_timed_pipeline_step_does_not_hang():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "benchmarks", "bench_pipeline.py"), "--skip-check", "--iters", "1",
           "--schedules", "1f1b,zb-h1", "--layers", "4", "--hidden", "512", "--ffn", "1408", "--heads", "8",
           "--kv-heads", "4", "--seq", "256", "--vocab", "512", "--hang-dump", "120"]  # its 1f1b hung before
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("bubble ") == 2, out.stdout
