"""The loop end to end on CPU: learning, exact resume, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

from megallama.arguments import parse_args
from megallama.training import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "3e-3", "--no-progress-bar", "--device", "cpu"]


def _corpus(tmp_path, n=200):
    path = tmp_path / "docs.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plums".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))}) + "\n")
    return str(path)


def _run(argv):
    return pretrain(parse_args(argv, world_size=1))


def test_loss_falls_and_resume_is_bit_exact(tmp_path):
    data = _corpus(tmp_path)
    common = TINY + ["--data-path", data, "--data-cache-dir", str(tmp_path / "cache"), "--train-iters", "12",
                     "--lr-warmup-iters", "2"]
    full = _run(common)["losses"]
    assert full[12] < full[1]
    ck = str(tmp_path / "ck")
    _run(common + ["--save", ck, "--save-interval", "6", "--exit-interval", "6"])
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "6"
    resumed = _run(common + ["--load", ck])["losses"]
    assert sorted(resumed) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # bit for bit


def _cli(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "pretrain_llama.py")] + args, capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.parametrize("case", ["missing_data", "bad_json", "unknown_model", "seq_too_long", "zero_batch",
                                  "bad_layout"])
def test_bad_input_one_line_exit_2(tmp_path, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    extra = {"missing_data": ["--data-path", str(tmp_path / "nope.jsonl")],
             "bad_json": ["--data-path", str(bad)],
             "unknown_model": ["--model", "llama9_7b"],
             "seq_too_long": ["--seq-length", "999999"],
             "zero_batch": ["--micro-batch-size", "0"],
             "bad_layout": ["--tensor-model-parallel-size", "3"]}[case]
    r = _cli(TINY + ["--train-iters", "1"] + extra, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    if case == "bad_json":
        assert "line 2" in lines[0]


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    data = _corpus(tmp_path, 50)
    ck = str(tmp_path / "ck")
    base = TINY + ["--data-path", data, "--data-cache-dir", str(tmp_path / "cache"), "--train-iters", "2"]
    _run(base + ["--save", ck, "--save-interval", "2"])
    before = sorted(os.listdir(ck))
    r = _cli([a if a != "64" else "96" for a in base] + ["--load", ck, "--save", ck, "--save-interval", "1"],
             tmp_path)
    assert r.returncode == 2 and "different model" in r.stderr, r.stderr[-1500:]
    assert sorted(os.listdir(ck)) == before


@pytest.mark.parametrize("precision", [[], ["--bf16", "--params-dtype", "fp32"], ["--num-experts", "4"]],
                         ids=["fp32", "bf16-autocast", "moe-fp32"])
def test_compile_trains_like_eager(tmp_path, precision):
    """``--compile`` (one compiled graph per decoder layer) goes through the same custom autograd Functions
    (parallel linears with their manual casts, the fused kernels, MoE's grouped GEMMs, whose fp32 CPU kernel has no
    meta twin to trace with): its losses follow eager's, to fp32 rounding (inductor fuses and reorders) or to
    bf16's."""
    common = TINY + ["--data-path", _corpus(tmp_path), "--data-cache-dir", str(tmp_path / "cache"),
                     "--train-iters", "3", "--lr-warmup-iters", "1"] + precision
    from torch._dynamo.utils import counters
    eager = _run(common)["losses"]
    counters.clear()
    compiled = _run(common + ["--compile"])["losses"]
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled
    tol = 1e-2 if "--bf16" in precision else 1e-5
    for step in eager:
        assert abs(compiled[step] - eager[step]) / abs(eager[step]) < tol, (step, compiled[step], eager[step])


def test_compile_has_no_graph_breaks(tmp_path):
    """A fresh process (kernels not loaded yet): ``--compile`` loads the fused kernels before tracing, so no layer's
    graph breaks (loading them inside the first compiled call broke it, 133 log lines of breaks)."""
    args = TINY + ["--data-path", _corpus(tmp_path), "--data-cache-dir", str(tmp_path / "cache"), "--train-iters",
                   "2", "--compile"]
    env = dict(os.environ, PYTHONPATH=REPO, TORCH_LOGS="graph_breaks")
    out = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_llama.py")] + args, capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "graph break" not in (out.stdout + out.stderr).lower(), out.stderr[-3000:]


@pytest.mark.parametrize("iters,extra", [(10, []), (9, ["--exit-interval", "7"])])
def test_iteration_time_is_per_step_and_excludes_eval_and_save(tmp_path, monkeypatch, iters, extra):
    """A fake clock: every step takes 1 s, evaluation 100 s, a save 50 s. Every log line (the last one after
    fewer than --log-interval steps included) must report 1 s per iteration."""
    import types

    import megallama.training as tr
    clock = [0.0]
    monkeypatch.setattr(tr, "time", types.SimpleNamespace(time=lambda: clock[0]))
    finalize = tr.finalize_model_grads

    def step_takes_1s(*a, **k):
        clock[0] += 1.0
        return finalize(*a, **k)

    def pause(seconds, result):
        def fn(*a, **k):
            clock[0] += seconds
            return result
        return fn
    monkeypatch.setattr(tr, "finalize_model_grads", step_takes_1s)
    monkeypatch.setattr("megallama.evaluation.evaluate", pause(100.0, 1.0))
    monkeypatch.setattr("megallama.checkpointing.run_saver.save_checkpoint", pause(50.0, "ck"))
    argv = TINY + ["--mock-data", "--vocab-size", "256", "--global-batch-size", "2", "--train-iters", str(iters),
                   "--log-interval", "4", "--eval-interval", "3", "--save", str(tmp_path / "ck"),
                   "--save-interval", "2"] + extra
    out = _run(argv)
    end = out["iteration"]
    assert sorted(out["iteration_time"]) == [s for s in range(1, end + 1) if s % 4 == 0 or s == end]
    assert all(t == pytest.approx(1.0) for t in out["iteration_time"].values()), out["iteration_time"]
