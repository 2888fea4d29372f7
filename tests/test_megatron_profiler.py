"""Megatron's --profile flags: with --use-pytorch-profiler a torch.profiler trace of iterations [start, end) lands
in --tensorboard-dir (only from --profile-ranks); the Nsight range and the allocator history need CUDA (one line
each on CPU; the CUDA paths run in the GPU test)."""
import glob
import json
import os
import re

import pytest

from dist_utils import run_distributed

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "5", "--no-progress-bar", "--device", "cpu", "--mock-data"]


def _steps(trace_dir):
    files = glob.glob(os.path.join(trace_dir, "*.pt.trace.json"))
    assert len(files) == 1, files
    events = json.load(open(files[0]))["traceEvents"]
    return sorted({int(m.group(1)) for e in events for m in [re.match(r"ProfilerStep#(\d+)", e.get("name", ""))]
                   if m})


def test_pytorch_profiler_traces_the_asked_iterations(tmp_path):
    pretrain(parse_args(TINY + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
                                "--profile-step-end", "4", "--tensorboard-dir", str(tmp_path)], world_size=1))
    assert _steps(tmp_path) == [2, 3]  # 0-based iterations 2 and 3, Megatron's counter


def _two_ranks(rank, world, folder):
    pretrain(parse_args(TINY + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "0",
                                "--profile-step-end", "1", "--profile-ranks", "1", "--tensorboard-dir", folder,
                                "--global-batch-size", "4"], world_size=world))


def test_only_the_profile_ranks_trace(tmp_path):
    run_distributed(_two_ranks, 2, str(tmp_path))
    assert _steps(tmp_path) == [0]


@pytest.mark.parametrize("extra,says", [
    (["--profile"], "needs CUDA; add --use-pytorch-profiler"),
    (["--profile", "--use-pytorch-profiler"], "writes its trace into --tensorboard-dir"),
    (["--use-pytorch-profiler"], "--use-pytorch-profiler needs --profile"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "x", "--profile-step-start", "3",
      "--profile-step-end", "3"], "must be >= 0 and below --profile-step-end 3"),
    (["--record-memory-history", "--profile", "--use-pytorch-profiler", "--tensorboard-dir", "x"],
     "nothing to record on CPU"),
])
def test_contradictions_are_one_line(extra, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_args(TINY + extra, world_size=1)


@pytest.mark.gpu
def test_nsight_range_and_memory_snapshot_on_cuda(tmp_path):
    snap = str(tmp_path / "snap.pickle")
    argv = [a if a != "cpu" else "cuda" for a in TINY]
    pretrain(parse_args(argv + ["--profile", "--profile-step-start", "1", "--profile-step-end", "3",
                                "--record-memory-history", "--memory-snapshot-path", snap], world_size=1))
    import pickle
    assert pickle.load(open(snap, "rb"))["segments"]  # dumped at a log line, with the allocator's segments
