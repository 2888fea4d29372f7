"""One layout, one estimate: tools/estimate_memory.py, the training flags' --dry-run (memory_args) and
--auto-configure price the same run alike, with the training flags' names, defaults and one-line errors."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.memory_args import estimate_for_args
from megallama.memory_cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

L70 = ["--model", "llama3_70b", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
       "--num-layers-per-virtual-pipeline-stage", "4", "--sequence-parallel", "--use-distributed-optimizer",
       "--micro-batch-size", "1", "--global-batch-size", "128", "--seq-length", "8192", "--bf16"]
L405 = ["--model", "llama3_405b", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "8",
        "--num-virtual-stages-per-pipeline-rank", "8", "--account-for-embedding-in-pipeline-split",
        "--account-for-loss-in-pipeline-split", "--sequence-parallel", "--use-distributed-optimizer",
        "--micro-batch-size", "1", "--global-batch-size", "512", "--seq-length", "8192", "--bf16",
        "--recompute-granularity", "full", "--optimizer", "sgd"]
MOE = ["--model", "llama3_8b", "--num-experts", "8", "--micro-batch-size", "1", "--global-batch-size", "8",
       "--seq-length", "4096", "--bf16"]
CP = ["--model", "llama3_8b", "--context-parallel-size", "8", "--cp-comm-type", "allgather", "--micro-batch-size",
      "1", "--global-batch-size", "8", "--seq-length", "65536", "--bf16", "--recompute-granularity", "full"]


@pytest.mark.parametrize("line,gpus,nodes", [
    (L70 + ["--microbatch-group-size-per-virtual-pipeline-stage", "8"], 8, 8),  # the flag was unknown to the tool
    (L405, 8, 64),
    (MOE, 8, 1),  # --num-experts alone makes a MoE model in training; the tool priced a dense one
    (CP, 8, 1)])
def test_tool_and_dry_run_give_the_same_numbers(line, gpus, nodes):
    tool = run(line + ["--gpus", str(gpus), "--nodes", str(nodes)])["estimate"]
    extra = ["--max-position-embeddings", "65536"] if line is CP else []
    args = parse_args(line + extra + ["--mock-data", "--dry-run"], world_size=gpus * nodes)
    dry = estimate_for_args(args, gpus, nodes, recommend=False)
    assert tool["breakdown_bytes"] == dry["breakdown_bytes"] and tool["worst_stage"] == dry["worst_stage"]
    assert tool["num_params"] == dry["num_params"]
    assert sum(tool["breakdown_bytes"].values()) == pytest.approx(tool["memory_per_gpu_gb"] * 2**30, abs=8)


def test_microbatch_group_is_priced_and_checked():
    """Megatron's warm-up with groups of N: 2(pp-1) + (v-1)N + 1 chunk forwards on the first stage."""
    base = run(L70 + ["--gpus", "8", "--nodes", "8", "--json"])["estimate"]
    wide = run(L70 + ["--gpus", "8", "--nodes", "8", "--microbatch-group-size-per-virtual-pipeline-stage", "8"])
    assert (base["layout"]["in_flight"], wide["estimate"]["layout"]["in_flight"]) == (2 * 3 + 4 * 4 + 1,
                                                                                       2 * 3 + 4 * 8 + 1)
    assert wide["estimate"]["breakdown_bytes"]["activations"] > base["breakdown_bytes"]["activations"]
    for n, says in ((2, "should range in [PP=4"), (96, "should range in [PP=4, M=64]"), (31, "remainder of M=64")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            run(L70 + ["--gpus", "8", "--nodes", "8", "--microbatch-group-size-per-virtual-pipeline-stage", str(n)])


def test_tool_takes_the_training_defaults_and_rules():
    gpus = ["--gpus", "8", "--seq-length", "4096"]
    moe = run(["--strategy", "moe"] + gpus)["estimate"]  # training: --strategy moe has 8 experts
    assert moe["layout"]["strategy"] == "moe" and moe["num_params"] == run(MOE + ["--gpus", "8"])["estimate"][
        "num_params"]
    lora_tool = run(["--strategy", "lora", "--gpus", "1", "--bf16"])["estimate"]
    line = ["--model", "llama3_8b", "--strategy", "lora", "--bf16", "--mock-data", "--dry-run"]
    lora_train = estimate_for_args(parse_args(line, world_size=1), 1, recommend=False)
    assert lora_tool["breakdown_bytes"]["optimizer"] == lora_train["breakdown_bytes"]["optimizer"]  # rank 8, not 16
    for bad, says in ((["--micro-batch-size", "0"], "--micro-batch-size must be a positive integer, got 0"),
                      (["--sgd-momentum", "0.5"], "add --optimizer sgd or drop --sgd-momentum"),
                      (["--optimizer", "sgd", "--sgd-momentum", "1"], "must be in [0, 1)")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            run(bad)


def test_auto_configure_takes_the_experts():
    out = run(["--strategy", "moe", "--num-experts", "8", "--gpus", "8", "--nodes", "2", "--seq-length", "4096",
               "--auto-configure"])
    assert out["plan"] is not None and out["estimate"]["layout"]["strategy"] == "moe"
    assert out["estimate"]["num_params"] > 40e9  # 8 experts of the dense FFN: 47.5B


def test_model_states_line_prices_the_optimizer_run():
    """Under --optimizer sgd the explanation said Adam's 18 bytes/param; SGD keeps master + momentum: 14."""
    plan = run(["--model", "llama3_8b", "--gpus", "8", "--optimizer", "sgd", "--auto-configure"])["plan"]
    assert "14 bytes/param (2 weights + 4 grads + 8 optimizer)" in plan["explanation"]
    floor = 14 * 8_030_261_248 / 8 / 2**30
    assert f"at best {floor:.1f} GiB per GPU" in plan["explanation"]
    plain = run(["--model", "llama3_8b", "--gpus", "8", "--optimizer", "sgd", "--sgd-momentum", "0",
                 "--auto-configure"])["plan"]
    assert "10 bytes/param (2 weights + 4 grads + 4 optimizer)" in plain["explanation"]


def test_auto_configure_plan_matches_the_dry_run_table_without_a_gpu(monkeypatch):
    """Planning a GPU run from a machine with none: the plan priced the CPU code paths (another head transient)
    while the --dry-run table priced CUDA, so the two numbers printed for one layout differed."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        args = parse_args(["--model", "llama3_70b", "--gpus", "8", "--nodes", "8", "--seq-length", "8192",
                           "--global-batch-size", "128", "--bf16", "--mock-data", "--auto-configure", "--dry-run",
                           "--optimizer", "sgd"], world_size=1)
    text = said.getvalue()
    planned = float(re.search(r"memory: ([0-9.]+) GiB per GPU", text).group(1))
    table = estimate_for_args(args, 8, 8, recommend=False)["memory_per_gpu_gb"]
    assert planned == pytest.approx(table, abs=0.051)
    assert "14 bytes/param (2 weights + 4 grads + 8 optimizer)" in text


def test_recommended_gpu_count_keeps_the_optimizer():
    """The 'with N GPUs use ...' advice re-chose the layout for Adam under --optimizer sgd."""
    adam = run(["--model", "llama3_8b", "--bf16"])["estimate"]["recommendations"][-1]
    sgd = run(["--model", "llama3_8b", "--bf16", "--optimizer", "sgd", "--sgd-momentum", "0"])["estimate"]
    line = sgd["recommendations"][-1]
    assert line.startswith("with 2 GPUs use") and line != adam
    tp, pp, dp, zero = map(int, re.search(r"tp (\d+) pp (\d+) dp (\d+) ZeRO-(\d)", line).groups())
    from megallama.memory import estimate_requirements
    est = estimate_requirements("llama3_8b", num_gpus=2, tp=tp, pp=pp, zero_stage=zero, k_bytes=4,
                                recompute=re.search(r"recompute (\w+)", line).group(1), sequence_parallel=tp > 1,
                                recommend=False)
    assert f"{est['memory_per_gpu_gb']:.1f} GiB per GPU (fits)" in line


# ---------------------------------------------------------------- the tool's table, JSON, flags and errors
def test_cli_table_json_and_errors():
    tool = os.path.join(ROOT, "tools", "estimate_memory.py")
    out = subprocess.run([sys.executable, tool, "--model", "llama2_7b", "--batch-size", "16", "--gpus", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "does NOT fit" in out.stdout and "activations" in out.stdout
    out = subprocess.run([sys.executable, tool, "--model", "tiny_llama3_50m", "--seq-length", "256", "--json"],
                         capture_output=True, text=True, timeout=120)
    data = json.loads(out.stdout)
    assert data["fits"] and data["layout"]["sequence_length"] == 256
    out = subprocess.run([sys.executable, tool, "--model", "llama3_8b", "--tensor-model-parallel-size", "8",
                          "--json"], capture_output=True, text=True, timeout=120)  # --gpus defaults to tp x pp x cp
    assert out.returncode == 0 and json.loads(out.stdout)["layout"]["world_size"] == 8, out.stderr
    out = subprocess.run([sys.executable, tool, "--model", "llama3_8b", "--tp", "3"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and len(out.stderr.strip().splitlines()) == 1


def test_cli_virtual_stages_follow_the_training_flags(capsys):
    """--num-layers-per-virtual-pipeline-stage implies the interleaved schedule (it was priced as 1F1B), a split it
    cannot make names the flag (it was floored to another v), and interleaved without it is refused, as training
    refuses them; Megatron's pinned first/last stage sizes are taken."""
    from megallama.memory_cli import main, run
    base = ["--model", "llama3_405b", "--tp", "8", "--pp", "14", "--gpus", "8", "--nodes", "28", "--seq-length",
            "8192", "--sequence-parallel", "--zero-stage", "1", "--recompute-granularity", "full",
            "--global-batch-size", "512"]
    implied = run(base + ["--num-layers-per-virtual-pipeline-stage", "3"])["estimate"]
    named = run(base + ["--num-layers-per-virtual-pipeline-stage", "3", "--pipeline-schedule", "interleaved"])
    assert implied["layout"]["pipeline_schedule"] == "interleaved"
    assert implied["memory_per_gpu_gb"] == named["estimate"]["memory_per_gpu_gb"]
    for extra, needle in ((["--num-layers-per-virtual-pipeline-stage", "4"], "does not split 126 layers over 14"),
                          (["--pipeline-schedule", "interleaved"], "needs --num-layers-per-virtual-pipeline-stage"),
                          (["--num-layers-per-virtual-pipeline-stage", "3", "--pipeline-schedule", "gpipe"],
                           "needs the interleaved schedule")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    pinned = run(["--model", "llama3_8b", "--pp", "4", "--decoder-first-pipeline-num-layers", "11"])["estimate"]
    assert pinned["stages"][0]["allocated_gb"] > run(["--model", "llama3_8b", "--pp", "4"])["estimate"]["stages"][0][
        "allocated_gb"]


def test_cli_auto_configure_json_stays_json_when_nothing_fits(capsys):
    """The reasons were printed before the JSON (stdout no longer parsed); they are now a field of it."""
    from megallama.memory_cli import main
    assert main(["--model", "llama3_405b", "--gpus", "8", "--auto-configure", "--seq-length", "8192", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["plan"] is None and "NO layout fits" in data["explanation"]


def test_cli_auto_configure_keeps_what_the_user_fixed(capsys):
    """--zero-stage, --recompute-granularity (or their aliases) were replaced by the search's choice and --tp 2
    was dropped without a word; train --auto-configure keeps the first two and refuses the third."""
    from megallama.memory_cli import main, run
    base = ["--model", "llama3_70b", "--gpus", "8", "--nodes", "8", "--seq-length", "8192", "--auto-configure"]
    for fixed in (["--zero-stage", "1", "--recompute-granularity", "full"],
                  ["--use-distributed-optimizer", "--activation-checkpointing"]):
        plan = run(base + fixed)["plan"]
        assert (plan["zero_stage"], plan["recompute"]) == (1, "full"), plan
    capsys.readouterr()
    assert main(base + ["--tp", "2"]) == 2
    assert capsys.readouterr().err == ("error: --auto-configure chooses the layout itself but "
                                       "--tensor-model-parallel-size 2 was given; drop one of them\n")
