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


def test_a_job_resuming_another_directorys_run_counts_only_its_own_flops(tmp_path):
    """--load other_run --save new_dir: the new progress file starts with this job, which resumed 3e16 FLOPs done
    elsewhere; its cumulative throughput is its own (Megatron's reading of the file alone counted the 3e16 in too:
    2.5x here)."""
    now = int(time.time())
    args = SimpleNamespace(log_progress=True, save=str(tmp_path), world_size=2, seq_length=1000,
                           run_start_time=now - 100)
    log = ProgressLog(args, consumed_samples=30_000, flops_per_token=1e9, rank=0)
    log.saved(40, consumed_samples=80_000)  # 5e16 FLOPs in this job's 100 s
    fields = dict(f.split(": ", 1) for f in (tmp_path / "progress.txt").read_text().splitlines()[-1].split("\t")[4:])
    for key in ("Job throughput", "Cumulative throughput"):
        assert float(fields[key].split()[0]) == pytest.approx(5e16 / (100 * 2e12), rel=0.02), fields


def test_log_progress_without_save_is_one_error_line(capsys):
    import pretrain_llama
    assert pretrain_llama.main(TINY + ["--log-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --log-progress writes into the --save directory, but no --save was given; add --save DIR or drop "
        "--log-progress"]


def test_flops_of_a_moe_run_are_megatrons_routed_and_shared_experts(tmp_path):
    """A MoE run's FLOPs (progress.txt, the summary, the log line's MFU) are Megatron's num_floating_point_operations:
    a sparse layer's FFN is top-k experts of --moe-ffn-hidden-size plus the shared expert, a dense layer's the dense
    FFN (the count was the dense model's whatever the experts)."""
    ck = str(tmp_path / "ck")
    args = parse_args(TINY + ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
                              "--log-progress", "--save", ck, "--strategy", "moe", "--num-experts", "4",
                              "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96", "--moe-layers", "1",
                              "--moe-shared-expert-intermediate-size", "32"], world_size=1)
    out = pretrain(args)
    cfg, s = args.model_config, args.seq_length
    h, L, n, g, V = cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size
    mlp = 1.5 * (cfg.ffn_hidden_size * (L - 1) + 96 * 2 * 1 + 32 * 1) / h  # 1 dense layer, 1 sparse (2 of 4 routed)
    megatron = 12 * h * h * (L * (1 + g / n + s / h) + mlp + V / (2 * h))  # per token
    assert out["flops_per_token"] == pytest.approx(megatron, rel=1e-12)
    assert out["flops_per_token"] > 1.15 * flops_per_token(cfg, s)  # the dense model's count: 14 % short
    saved = open(os.path.join(ck, "progress.txt")).read().splitlines()[-1].split("\t")
    assert saved[7] == f"Floating-point operations: {2 * s * megatron:.2e}", saved
