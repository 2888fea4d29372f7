"""Launch failures under torchrun say one line: a parser error once (rank 0) and in torchrun's failure summary; a
rank that died or stalled as "lost contact" on the survivors, not ~60 lines of gloo traceback; an interleaved
schedule without enough microbatches while parsing, before any model is built."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from dist_utils import free_port
from megallama.arguments import parse_args
from megallama.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--micro-batch-size", "1"]


def _clean_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"):
        env.pop(key, None)
    return env


def test_a_parser_error_under_torchrun_is_one_line_from_rank_0_and_in_the_summary(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "pretrain_llama.py"), "--zero-stage", "4"],
                       capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300)
    assert r.returncode != 0
    line = "error: argument --zero-stage: invalid choice: 4"
    assert r.stderr.count(line) == 1, r.stderr  # rank 1 exits 2 without a word
    # torchrun's summary shows the message, not "To enable traceback see ..."
    assert "traceback : ConfigError: argument --zero-stage: invalid choice: 4" in r.stderr, r.stderr
    assert "To enable traceback" not in r.stderr, r.stderr


def test_interleaved_with_too_few_microbatches_is_refused_while_parsing():
    with pytest.raises(ConfigError, match=r"the interleaved schedule needs at least as many microbatches as pipeline "
                                          r"stages \(1 < 2\)"):
        parse_args(TINY + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                           "--global-batch-size", "1"], world_size=2)
    assert parse_args(TINY + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                              "--global-batch-size", "2"], world_size=2).num_microbatches == 2


# rank 1 leaves in the middle of a run of all-reduces: dies (os._exit) or stalls past the 3 s timeout
LOSE_RANK_1 = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from megallama.initialize import initialize_distributed, run_script

def body():
    initialize_distributed("gloo", "cpu", timeout_minutes=0.05)
    t = torch.ones(4)
    for i in range(20):
        if dist.get_rank() == 1 and i == 3:
            if {stall!r}:
                time.sleep(60)
            os._exit(1)
        dist.all_reduce(t)

sys.exit(run_script(body))
"""


@pytest.mark.parametrize("stall, reason", [(False, r"gloo: Connection (closed|reset) by peer"),  # as the OS has it
                                           (True, r"gloo: Timed out waiting 3000ms for recv operation to complete")])
def test_a_rank_lost_mid_collective_is_one_line_on_the_survivor(tmp_path, stall, reason):
    script = tmp_path / "lose_rank_1.py"
    script.write_text(LOSE_RANK_1.format(root=ROOT, stall=stall))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(_clean_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r),
                                       WORLD_SIZE="2", LOCAL_RANK=str(r)))
             for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err
    assert "Traceback" not in err, err
    assert re.fullmatch(rf"error: lost contact with another rank during all_reduce in body \(lose_rank_1.py:16\) "
                        rf"\({reason}\); a rank died or stalled — see its own output above / torchrun's summary "
                        "for which", err.strip().splitlines()[-1]), err


def test_only_a_lost_peer_is_recognised_other_errors_keep_their_traceback():
    from megallama.collective_errors import collective_failure
    from megallama.initialize import run_script
    assert collective_failure(RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                                           "peer [127.0.0.1]:3472")) == "gloo: Connection closed by peer"
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
                RuntimeError("[third_party/gloo/gloo/allreduce.cc:93] Gloo allreduce: tensor sizes differ"),
                RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage"),
                ConnectionResetError("Connection reset by peer")):  # not a collective's
        assert collective_failure(bug) is None

        def body(e=bug):
            raise e
        with pytest.raises(type(bug)):
            run_script(body)
