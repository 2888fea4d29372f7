"""Empty pipeline stages, as Megatron allows them ("it is legal to have empty stages, e.g., E||t|L"): a stage (or
virtual stage) between the first and the last may hold nothing, and passes the hidden state on unchanged forward and
the grad back unchanged backward; a rank whose chunks are all empty holds no parameters at all.

They were refused while parsing ("stage 1 is empty (no t, E or L), which megallama's pipeline does not build"). Now
"Et||ttL" (pp 3: rank 1 holds nothing), "E|t||tL" (pp 4), "Et|||tL" under Chimera (rank 1 holds both copies of two
empty parts) and interleaved layouts with an empty virtual chunk (pp 2) or a rank of empty chunks (pp 3) train equal
to one process under every schedule (losses and grads within 1e-5 relative, fp32, gloo CPU ranks), through DDP and
ZeRO 1-3 too; the training loop (optimizer, grad clipping, params norm, evaluation) matches one process, and a
checkpoint saved with an empty stage loads at pp 1 and the other way round. Under LoRA an empty stage holds no
adapters (test_lora_stage_without_layers.py)."""
import os

import pytest

from dist_utils import run_distributed
from loop_harness import train_losses
from pp_harness import check_against_reference, reference, tiny_config
from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.pipeline.layout import parse_layout
from test_pipeline_uneven_virtual import Case, _run_cases

# world size -> cases run on that many pipeline stages; counts are a layout's decoder layers per model part
CASES = {
    2: [Case("interleaved-empty-virtual-chunk", 3, counts=(1, 1, 0, 1)),  # "Et|t||tL": rank 0 holds [1, 0]
        Case("interleaved-empty-virtual-chunk-zero1", 3, counts=(1, 1, 0, 1), tied=True, zero_stage=1)],
    3: [Case("1f1b", 3, schedule="1f1b", counts=(1, 0, 2)),  # "Et||ttL": rank 1 holds no parameter
        Case("1f1b-tied-fused", 3, schedule="1f1b", counts=(1, 0, 2), tied=True, step="fused", microbatches=5),
        Case("gpipe", 3, schedule="gpipe", counts=(1, 0, 2)),
        Case("zb-h1", 3, schedule="zb-h1", counts=(1, 0, 2), tied=True),
        Case("zb-h1-zero3", 3, schedule="zb-h1", counts=(1, 0, 2), zero_stage=3),  # W by recomputation
        Case("chimera-middle", 3, schedule="chimera", counts=(1, 0, 2), tied=True),
        Case("zero0", 3, schedule="1f1b", counts=(1, 0, 2), tied=True, zero_stage=0),
        Case("zero2", 3, schedule="1f1b", counts=(1, 0, 2), zero_stage=2),
        Case("eval", 3, schedule="1f1b", counts=(1, 0, 2), forward_only=True, microbatches=3),
        Case("interleaved-empty-rank", 4, counts=(1, 0, 1, 1, 0, 1), tied=True)],  # rank 1: parts 1 and 4
    4: [Case("1f1b-E-alone-and-empty", 2, schedule="1f1b", counts=(0, 1, 0, 1)),  # "E|t||tL"
        Case("chimera-empty-rank", 2, schedule="chimera", counts=(1, 0, 0, 1), tied=True)],  # "Et|||tL"
}


@pytest.fixture(scope="module")
def runs():
    return {world: run_distributed(_run_cases, world, cases) for world, cases in CASES.items()}


@pytest.mark.parametrize("world, case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_empty_stages_equal_one_process(runs, world, case):
    per_rank = {r: v[case.name] for r, v in runs[world].items()}
    counts, starts = list(case.counts), [sum(case.counts[:k]) for k in range(len(case.counts))]
    for r, res in per_rank.items():  # each chunk builds exactly the global layer ids of its part, none when empty
        if case.schedule == "chimera":
            parts = [r, world - 1 - r]
        else:
            parts = list(range(r, len(counts), world))
        assert res["layers"] == [list(range(starts[k], starts[k] + counts[k])) for k in parts]
        if all(counts[k] == 0 and 0 < k < len(counts) - 1 for k in parts):
            assert res["grads"] == [] and res.get("pieces", []) == []  # nothing at all on that rank
    ref_losses, ref_grads = reference(tiny_config(case.layers, case.tied), case.microbatches, case.step)
    if case.forward_only:
        got = per_rank[world - 1]["losses"]
        assert len(got) == case.microbatches and all(abs(g - e) <= 1e-5 * abs(e) for g, e in zip(got, ref_losses))
        return
    check_against_reference(per_rank, ref_losses, ref_grads, case.microbatches, world)


# ------------------------------------------------------------------ flags
BASE = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--train-iters", "1", "--device", "cpu"]


def _parse(pp, layout, *extra):
    return parse_args(BASE + ["--pipeline-model-parallel-size", str(pp), "--pipeline-model-parallel-layout", layout,
                              *extra], world_size=pp)


def test_layouts_with_empty_stages_parse():
    assert parse_layout("E||t|L", 4, 1) == [0, 0, 1, 0]  # Megatron's own example
    assert _parse(3, "Ett||ttL").pipeline_layer_counts == [2, 0, 2]
    a = _parse(2, "Et|t||ttL")
    assert a.pipeline_layer_counts == [1, 1, 0, 2] and a.pipeline_schedule == "interleaved"
    assert _parse(4, "Et|||tttL", "--pipeline-schedule", "chimera").pipeline_layer_counts == [1, 0, 0, 3]


@pytest.mark.parametrize("pp, layout, extra, msg", [
    (3, "|Ett|ttL", [], "the first stage is empty"),
    (3, "Ett|ttL|", [], "the last stage is empty"),
])
def test_empty_stage_refusals_are_one_line(pp, layout, extra, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        _parse(pp, layout, *extra)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the training loop and checkpoints
ARGS = ["--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--lr", "3e-3",
        "--lr-warmup-iters", "1", "--no-progress-bar", "--device", "cpu", "--mock-data", "--no-fused-kernels",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4", "--clip-grad", "0.5",
        "--log-params-norm", "--zero-stage", "1", "--eval-interval", "2", "--eval-iters", "1"]
EMPTY = ["--pipeline-model-parallel-size", "3", "--pipeline-model-parallel-layout", "Et||ttL"]


def _close(got, ref, steps):
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def test_loop_and_checkpoints_with_an_empty_stage(tmp_path):
    """pp 3 with rank 1 empty (no parameters: its optimizer, clipping and params norm join with nothing) trains
    as one process; its step-2 checkpoint resumes at pp 1, and one process's resumes under "Et||ttL"."""
    ck_pp, ck_one = str(tmp_path / "pp"), str(tmp_path / "one")
    save = ["--save-interval", "2", "--save"]
    one = run_distributed(train_losses, 1, ARGS + save + [ck_one])[0]
    for losses in run_distributed(train_losses, 3, ARGS + EMPTY + save + [ck_pp]).values():
        _close(losses, one, range(1, 5))
    _close(run_distributed(train_losses, 1, ARGS + ["--load", os.path.join(ck_pp, "iter_0000002")])[0], one,
           range(3, 5))
    for losses in run_distributed(train_losses, 3, ARGS + EMPTY + ["--load", os.path.join(ck_one, "iter_0000002")]
                                  ).values():
        _close(losses, one, range(3, 5))


def test_memory_estimate_prices_an_empty_stage():
    """ZB-H1's estimate divided a stage's queued weight-grad memory by its layer count (ZeroDivisionError on an empty
    stage); an empty stage prices no weights and a small fraction of a full stage under every schedule."""
    from megallama.config import get_model_config
    from megallama.memory import estimate_requirements
    cfg = get_model_config("llama3_8b").replace(num_layers=8)
    for schedule in ("gpipe", "1f1b", "zb-h1", "chimera"):
        est = estimate_requirements("llama3_8b", model_config=cfg, num_gpus=3, pp=3, pipeline_schedule=schedule,
                                    num_microbatches=4, sequence_length=1024, recommend=False,
                                    pipeline_layer_counts=[3, 0, 5])
        stages = est["stages"]
        assert stages[1]["params"] == 0, schedule  # Chimera: both copies of the middle part, both empty
        assert 0 < stages[1]["allocated_gb"] < 0.05 * stages[0]["allocated_gb"], (schedule, stages)
