"""--log-progress: Megatron's progress.txt in --save, appended across a resume, in Megatron's tab-separated format
(job start, checkpoint iteration, job and cumulative throughput, FLOPs and tokens so far; async saves scheduled and
published), and the cumulative throughput read back from the file as Megatron's ``get_start_time_from_progress_log``
does."""
import os
import re
import time
from datetime import datetime
from types import SimpleNamespace

import pytest

from ckpt_helpers import TINY
from megallama.arguments import parse_args
from megallama.logging import flops_per_token
from megallama.progress_log import ProgressLog, cumulative_start
from megallama.training import pretrain

BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--log-progress"]
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


def test_progress_file_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    ck = str(tmp_path / "ck")
    pretrain(parse_args(BASE + ["--save", ck, "--save-interval", "2", "--exit-interval", "2", "--async-save"],
                        world_size=1))
    args = parse_args(BASE + ["--load", ck, "--save", ck, "--save-interval", "2"], world_size=1)
    pretrain(args)
    lines = [line.split("\t") for line in open(os.path.join(ck, "progress.txt")).read().splitlines()]
    assert [t[3:5] for t in lines] == [["Starting job"], ["Saving async checkpoint", "Iteration: 2"],
                                       ["Saved async checkpoint", "Iteration: 2"], ["Starting job"],
                                       ["Saved checkpoint", "Iteration: 4"]], lines
    for t in lines:
        assert _STAMP.match(t[0]) and t[1:3] == ["Job ID: 4711", "# GPUs: 1"], t
    flops = 4 * 4 * args.seq_length * flops_per_token(args.model_config, args.seq_length)  # 16 samples
    saved = lines[-1]
    assert re.fullmatch(r"Job throughput: \d+\.\d TFLOP/s/GPU", saved[5]), saved
    assert re.fullmatch(r"Cumulative throughput: \d+\.\d TFLOP/s/GPU", saved[6]), saved
    assert saved[7:] == [f"Floating-point operations: {flops:.2e}", "Tokens (in billions): 0.00"], saved


def _line(when, gpus, text):
    return f"{datetime.fromtimestamp(when).strftime('%Y-%m-%d %H:%M:%S')}\tJob ID: \t# GPUs: {gpus}\t{text}\n"


def _save(kind, it, flops):
    return f"{kind}\tIteration: {it}\tJob throughput: 1.0 TFLOP/s/GPU\tCumulative throughput: 1.0 TFLOP/s/GPU\t" \
           f"Floating-point operations: {flops:.2e}\tTokens (in billions): 0.01"


def test_throughputs_count_this_job_and_the_run_of_jobs_with_this_gpu_count(tmp_path):
    """Jobs: 4 GPUs (ignored: another GPU count), then 2 GPUs from t0 with 2e16 FLOPs done, an async save that was
    never published (its FLOPs do not count), and this job (2 GPUs, started 100 s ago at 3e16 FLOPs)."""
    now = int(time.time())
    t0 = now - 1000
    path = tmp_path / "progress.txt"
    path.write_text(_line(t0 - 500, 4, "Starting job") + _line(t0 - 400, 4, _save("Saved checkpoint", 10, 2e16)) +
                    _line(t0, 2, "Starting job") + _line(t0 + 200, 2, _save("Saved checkpoint", 20, 3e16)) +
                    _line(t0 + 300, 2, _save("Saving async checkpoint", 30, 9e16)) +
                    _line(t0 + 301, 2, "Saved async checkpoint\tIteration: 20") +
                    "a line that is not a progress line\n")
    assert cumulative_start(str(path), 2) == (float(t0), 2e16)
    assert cumulative_start(str(path), 4) is None  # a later job with other GPUs ended that run of jobs
    args = SimpleNamespace(log_progress=True, save=str(tmp_path), world_size=2, seq_length=1000,
                           run_start_time=now - 100)
    log = ProgressLog(args, consumed_samples=30_000, flops_per_token=1e9, rank=0)  # 3e16 FLOPs done at its start
    log.saved(40, consumed_samples=130_000)  # 1.3e17: 1e17 in this job's 100 s, 1.1e17 since t0
    fields = dict(f.split(": ", 1) for f in path.read_text().splitlines()[-1].split("\t")[4:])
    assert float(fields["Job throughput"].split()[0]) == pytest.approx(1e17 / (100 * 2e12), rel=0.02)
    assert float(fields["Cumulative throughput"].split()[0]) == pytest.approx(1.1e17 / (1000 * 2e12), rel=0.02)
    assert fields["Floating-point operations"] == "1.30e+17" and fields["Tokens (in billions)"] == "0.13"
    ProgressLog(args, consumed_samples=0, flops_per_token=1e9, rank=1).saved(1, 1)  # rank 1 writes nothing
    assert path.read_text().count("\n") == 9


def test_log_progress_without_save_is_one_error_line(capsys):
    import pretrain_llama
    assert pretrain_llama.main(TINY + ["--log-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --log-progress writes into the --save directory, but no --save was given; add --save DIR or drop "
        "--log-progress"]
