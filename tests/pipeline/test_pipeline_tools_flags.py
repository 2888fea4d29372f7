"""tools/pipeline_timeline.py and benchmarks/bench_pipeline.py take the training script's
--pipeline-model-parallel-layout and --microbatch-group-size-per-virtual-pipeline-stage (on CPU, tiny)."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from dist_utils import free_port
from megallama.pipeline.schedules import build_schedule
from megallama.pipeline.simulate import simulate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    path = os.path.join(ROOT, "tools", "pipeline_timeline.py")
    spec = importlib.util.spec_from_file_location("pipeline_timeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _bubble(text):
    return float(re.search(r"^bubble ([0-9.]+)", text, re.M).group(1))


def test_timeline_takes_the_layout_and_prices_each_part(capsys):
    main = _tool()
    assert main(["--pipeline-model-parallel-size", "2", "--microbatches", "4",
                 "--pipeline-model-parallel-layout", "Et|ttt|t|tL"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("interleaved: 2 stages, 4 microbatches, 2 chunks per stage")  # the layout's v
    want = simulate(build_schedule("interleaved", 2, 4, 2), None, [1, 3, 1, 1]).bubble_fraction()
    assert _bubble(out) == pytest.approx(want, abs=1e-3)
    assert abs(_bubble(out) - simulate(build_schedule("interleaved", 2, 4, 2)).bubble_fraction()) > 0.1
    # --model adds the output layer's cost to the last part (its 128K-row head outweighs the tiny layers)
    assert main(["--stages", "2", "--microbatches", "4", "--pipeline-model-parallel-layout", "Et|ttt|t|tL",
                 "--model", "tiny_llama3_50m", "--num-layers", "6"]) == 0
    weights = re.search(r"part weights \[([^]]*)\]", capsys.readouterr().out).group(1)
    w = [float(x.strip(" '")) for x in weights.split(",")]
    assert w[:3] == pytest.approx([1, 3, 1], rel=1e-3) and w[3] > 2


def test_timeline_takes_the_group_size(capsys):
    main = _tool()
    argv = ["--schedule", "interleaved", "--stages", "2", "--microbatches", "8"]
    assert main(argv + ["--microbatch-group-size-per-virtual-pipeline-stage", "4"]) == 0
    out = capsys.readouterr().out
    assert "groups of 4 microbatches" in out and "in flight per stage [7, 5]" in out
    assert main(argv) == 0
    assert "in flight per stage [5, 3]" in capsys.readouterr().out


def test_timeline_refuses_bad_flags_in_one_line(capsys):
    main = _tool()
    assert main(["--stages", "2", "--pipeline-model-parallel-layout", "Et|ttt|t|tL", "--schedule", "1f1b"]) == 2
    assert main(["--stages", "2", "--microbatches", "7", "--schedule", "interleaved",
                 "--microbatch-group-size-per-virtual-pipeline-stage", "3"]) == 2  # 7 % 3 = 1 < pp: Megatron's check
    err = capsys.readouterr().err
    assert "interleaved needs virtual stages" in err and "remainder of M=7" in err
    assert main(["--compare", "--stages", "2", "--microbatches", "4", "--pipeline-model-parallel-layout",
                 "E|tt|tt|L"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["interleaved"]  # the only schedule that runs virtual stages


def test_bench_runs_a_layout_and_a_group_size_on_cpu():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "benchmarks", "bench_pipeline.py"), "--device", "cpu", "--schedules", "interleaved,1f1b",
           "--num-layers", "6", "--pipeline-model-parallel-layout", "Et|ttt|t|tL",
           "--microbatch-group-size-per-virtual-pipeline-stage", "4", "--microbatches", "8", "--iters", "1",
           "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2", "--seq", "32", "--vocab", "128",
           "--mbs", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "parts [1, 3, 1, 1]; runs interleaved" in out.stdout
    assert re.search(r"check interleaved .* OK", out.stdout), out.stdout
    assert out.stdout.count("bubble ") == 1 and "replay-with-measured-op-times" in out.stdout
