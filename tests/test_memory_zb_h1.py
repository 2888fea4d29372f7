"""ZB-H1's memory: the estimate holds 1F1B's whole microbatches plus, per microbatch between its B and W, the
queued weight-gradient GEMM inputs; checked against the schedule's own order, two-rank CPU training peaks, and the
estimate-memory tool and cli dry-run (every schedule that trains can be estimated)."""
import json
import os
import subprocess
import sys

from dist_utils import run_distributed
from megallama.memory import estimate_requirements
from test_memory import ROOT, TINY, _measure


def _zb_worker(rank, world, configs, field="wgrad_queued"):
    """Per rank: the measured peak against its pipeline stage's estimate (not the busiest one's), with the stage's
    ``field`` of the estimate."""
    from megallama import memory
    out = []
    for argv in configs:
        seen = {}
        orig = memory.estimate_requirements

        def spy(*a, **k):
            seen.update(orig(*a, **k))
            return seen
        memory.estimate_requirements = spy
        try:
            rec = _measure(argv)
        finally:
            memory.estimate_requirements = orig
        from megallama.mpu import parallel_state as ps
        stage = ps.get_pipeline_model_parallel_rank()  # = rank at dp 1
        est = seen["stages"][stage]["allocated_gb"] * memory.GiB - memory.WORKSPACE_BYTES  # as estimate_for on CPU
        out.append((est / rec["measured"]["peak_allocated_this_rank"] - 1, seen["stages"][stage][field]))
    return out


def test_zb_h1_holds_1f1b_microbatches_plus_queued_weight_grads():
    """ZB-H1's order (pipeline/schedules.py): at every F or B a stage holds 1F1B's min(pp - stage, m) microbatches
    whole and min(pp, m) minus those with their W pending; while a W runs one fewer whole, one more pending."""
    from megallama.memory import _zb_h1
    from megallama.pipeline.schedules import build_schedule
    for p, m in ((2, 4), (3, 7), (4, 3), (4, 5), (4, 16), (8, 32)):
        sched = build_schedule("zb-h1", p, m)
        for stage in range(p):
            whole, queued, states = 0, 0, set()
            for a in sched.actions[stage]:
                whole += a.kind == "F"
                states.add((whole, queued))
                whole, queued = whole - (a.kind == "B"), queued + (a.kind == "B") - (a.kind == "W")
            k, q = _zb_h1(p, stage, m, 0, "standard", min(p - stage, m))
            assert {(k, q), (k - 1, q + 1)} <= states, (p, m, stage)
            assert all(w <= k and w + n <= k + q for w, n in states), (p, m, stage)


def test_zb_h1_training_step_two_ranks():
    """pp 2 under ZB-H1 (none / full recompute): each stage's measured peak within 4% of its own estimate; the last
    stage holds a microbatch's queued W inputs (q/k/v, o, gate/up, down inputs and output grads) on top of 1F1B's."""
    pp = TINY[:2] + ["--num-layers", "4"] + TINY[4:] + ["--pipeline-model-parallel-size", "2",
                                                        "--global-batch-size", "8", "--pipeline-schedule", "zb-h1"]
    configs = [pp, pp + ["--recompute-granularity", "full"]]
    errs = run_distributed(_zb_worker, 2, configs)
    for rank, values in errs.items():
        for cfg, (err, queued) in zip(configs, values):
            assert queued == rank and abs(err) < 0.04, (rank, cfg[-2:], err)


def test_zb_h1_estimate_cli_and_dry_run():
    """Every schedule that trains can be estimated: the tool, cli train --dry-run and the selective-recompute
    rule of the training flags (--recompute-num-layers is for full recompute only)."""
    base = dict(model_variant="llama3_8b", num_gpus=8, tp=2, pp=2, global_batch_size=32, recommend=False)
    zb, one = estimate_requirements(**base, pipeline_schedule="zb-h1"), estimate_requirements(**base)
    assert zb["stages"][1]["wgrad_queued"] == 1 and zb["stages"][1]["in_flight"] == one["stages"][1]["in_flight"]
    assert zb["stages"][1]["allocated_gb"] > one["stages"][1]["allocated_gb"]
    tool = os.path.join(ROOT, "tools", "estimate_memory.py")
    out = subprocess.run([sys.executable, tool, "--model", "llama3_8b", "--gpus", "8", "--pipeline-model-parallel-size",
                          "2", "--pipeline-schedule", "zb-h1", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["layout"]["pipeline_schedule"] == "zb-h1", out.stderr
    out = subprocess.run([sys.executable, tool, "--recompute-granularity", "selective", "--recompute-num-layers",
                          "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: --recompute-num-layers applies to"), out.stderr
    out = subprocess.run([sys.executable, "-m", "megallama.cli", "train", "--model", "llama3_8b", "--gpus", "8",
                          "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                          "--pipeline-schedule", "zb-h1", "--bf16", "--global-batch-size", "32", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "zb-h1 holding 2 in flight" in out.stdout, out.stderr[-2000:]
