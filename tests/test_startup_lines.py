"""The start-up lines describe the run as built: the model line counts experts and LoRA adapters (it gave the dense
size), rank 0's holdings under ZeRO-3 are its shard (it said the whole stage), and the layout line names sequence
parallelism, the pipeline schedule, recompute and the cp communication."""
import contextlib
import io
import re

import pytest

from dist_utils import run_distributed
from megallama.arguments import parse_args
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "1", "--mock-data", "--no-progress-bar", "--device", "cpu", "--train-iters", "1"]


def _said(argv, world=1):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        pretrain(parse_args(list(argv), world_size=world))
    return text.getvalue()


def _said_on_rank(rank, world, argv):
    return _said(argv, world)


def _count(text: str) -> float:
    n, unit = re.match(r"([\d.]+)([KMB]?)", text).groups()
    return float(n) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit]


def _line(out: str, start: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(start))


@pytest.mark.parametrize("extra, part", [
    (["--num-experts", "4"], "in 4 experts x 2 MoE layers"),
    (["--num-experts", "4", "--moe-layer-freq", "2", "--moe-shared-expert-intermediate-size", "32",
      "--moe-shared-expert-gate", "--moe-ffn-hidden-size", "48"], "in 4 experts x 1 MoE layer)"),
    (["--strategy", "lora", "--lora-target-modules", "all", "--lora-rank", "4"], "LoRA adapters on a frozen base"),
    (["--strategy", "hybrid", "--num-experts", "2", "--moe-layer-freq", "2", "--lora-target-modules", "all",
      "--moe-shared-expert-intermediate-size", "32"], "in 2 experts x 1 MoE layer;"),
])
def test_model_line_counts_the_model_as_built(extra, part, one_thread):
    """At one process rank 0 holds the whole model: the model line's count is the built one's."""
    out = _said(TINY + ["--global-batch-size", "1", "--dry-run"] + extra)
    model = _line(out, "model: ")
    total = model.split("): ", 1)[1]
    held = _line(out, "global rank 0 holds ").split(" holds ", 1)[1]
    assert _count(total) == _count(held) > 100e3 * (extra[1] != "lora"), (model, held)
    assert part in model


def test_zero3_line_says_the_shard_rank_0_stores():
    out = run_distributed(_said_on_rank, 2, TINY + ["--global-batch-size", "2", "--zero-stage", "3", "--dry-run"])[0]
    line = _line(out, "global rank 0 ")
    assert len([ln for ln in out.splitlines() if ln.startswith("global rank 0 ")]) == 1
    assert "stores 45.22K parameters (its ZeRO-3 shard of the 90.43K of its stage)" in line, line
    assert "gathers one unit" in line and "dp=2" in line and "zero stage 3" in line, line


@pytest.mark.parametrize("world, extra, said, unsaid", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "full"],
     ", sequence parallel, recompute full (uniform 1)", "schedule"),
    (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "gpipe", "--recompute-granularity",
         "selective"], ", schedule gpipe, recompute selective", "cp comm"),
    (2, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"], ", cp comm a2a", "schedule"),
])
def test_layout_line_names_the_settings_that_change_the_work(world, extra, said, unsaid):
    out = run_distributed(_said_on_rank, world, TINY + ["--global-batch-size", "2", "--dry-run"] + extra)[0]
    line = _line(out, "global rank 0 holds ")
    assert said in line and unsaid not in line, line


def test_layout_line_says_nothing_more_by_default(one_thread):
    line = _line(_said(TINY + ["--global-batch-size", "1", "--dry-run"]), "global rank 0 holds ")
    assert line.endswith("vpp=None, zero stage 0)"), line


def test_dry_run_layout_names_expert_parallelism(capsys, one_thread):
    from megallama.cli import main
    tiny = [a for a in TINY if a not in ("--device", "cpu", "--no-progress-bar")]
    assert main(["train", "--gpus", "4"] + tiny + ["--global-batch-size", "4", "--num-experts", "4",
                                                   "--expert-model-parallel-size", "2", "--dry-run"]) in (0, None)
    layout = _line(capsys.readouterr().out, "layout: ")
    assert "4 GPUs = tp 1 x pp 1 x dp 4 x cp 1, experts over ep 2, ZeRO-0" in layout, layout


def test_resume_line_names_the_zero_stage_of_both_layouts(tmp_path, one_thread):
    """dp 2 at ZeRO-1 resumed on one process at ZeRO-0: the line named the grids, not the stages."""
    ck = str(tmp_path / "ck")
    base = TINY + ["--global-batch-size", "2", "--lr-decay-iters", "4", "--save", ck, "--load", ck]
    run_distributed(_said_on_rank, 2, base + ["--zero-stage", "1"])
    line = _line(_said(base + ["--train-iters", "2", "--zero-stage", "0"]), "layout changed since the save (")
    assert "'ep': 1, 'zero_stage': 1} -> {'world_size': 1" in line and "'zero_stage': 0})" in line, line
