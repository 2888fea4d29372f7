"""Uneven virtual pipeline stages, as Megatron-core builds them: a --pipeline-model-parallel-layout with any counts
per virtual stage (the embedding or the loss alone on a stage included), --decoder-first/last-pipeline-num-layers
with virtual stages (the pin is the whole first/last rank, spread over its chunks) and
--account-for-embedding/loss-in-pipeline-split with virtual stages (Llama 3.1 405B: 126 layers, pp 8 x 8 chunks).

Each of these was refused before, in one line: "gives virtual stages [2, 1, 1, 3] decoder layers, but megallama's
interleaved schedule cuts equal chunks", "--decoder-first-pipeline-num-layers cannot be combined with the
interleaved schedule", "--num-virtual-stages-per-pipeline-rank 2 does not split 6 layers into 2 stages x 2
chunks" (account-for) and "stage 0 ('E') holds no decoder layer". Now they train, equal to one process: losses
and every grad within 1e-5 relative (fp32, gloo CPU ranks)."""
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from dist_utils import run_distributed
from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.pipeline import allreduce_embedding_gradients, build_model_chunks, get_forward_backward_func
from megallama.pipeline.layout import parse_layout
from megallama.pipeline.partition import megatron_split
from pp_harness import (MBS, SEED, SEQ, STEPS, check_against_reference, collect, collect_pieces, finish_grads,
                        make_batches, reference, tiny_config)


@dataclass(frozen=True)
class Case:
    name: str
    layers: int
    schedule: str = "interleaved"
    counts: Optional[Tuple[int, ...]] = None  # a layout's decoder layers per model part
    first: Optional[int] = None  # Megatron's pins with --num-virtual-stages-per-pipeline-rank
    last: Optional[int] = None
    chunks: Optional[int] = None
    tied: bool = False
    step: str = "per_token"
    microbatches: int = 4
    forward_only: bool = False
    zero_stage: Optional[int] = None


CASES = [
    Case("layout-2113", 7, counts=(2, 1, 1, 3)),  # rank 0 holds [2, 1], rank 1 [1, 3]
    Case("layout-2113-tied-fused", 7, counts=(2, 1, 1, 3), tied=True, step="fused", microbatches=5),
    Case("pins-vpp", 8, first=2, last=6, chunks=2),  # [1, 3, 1, 3]
    Case("embedding-and-loss-alone-tied", 5, counts=(0, 2, 3, 0), tied=True),  # "E|tt|ttt|L"
    Case("embedding-and-loss-alone-eval", 5, counts=(0, 2, 3, 0), forward_only=True, microbatches=3),
    Case("embedding-and-loss-alone-ddp", 5, counts=(0, 2, 3, 0), tied=True, zero_stage=0),
    Case("1f1b-embedding-alone", 3, schedule="1f1b", counts=(0, 3)),  # "E|tttL"
    Case("1f1b-loss-alone-tied", 3, schedule="1f1b", counts=(3, 0), tied=True),  # "Ettt|L"
]


def _run_cases(rank, world, cases):
    """Every case on ``world`` ranks, all of them pipeline stages (pp = world); returns {case name: what collect
    gives, plus the global layer ids of each chunk}. test_empty_stages.py runs it at pp 3 and 4 too."""
    ps.initialize_model_parallel(1, world)
    out = {}
    for case in cases:
        cfg = tiny_config(case.layers, case.tied)
        chunks = build_model_chunks(cfg, seed=SEED, schedule=case.schedule, first_stage_num_layers=case.first,
                                    last_stage_num_layers=case.last, num_virtual_stages=case.chunks,
                                    layer_counts=case.counts)
        M = case.microbatches
        data = iter(make_batches(M, cfg.vocab_size))
        fb = get_forward_backward_func(world, case.schedule)
        layers = [sorted(int(i) for i in c.model.layers.keys()) for c in chunks]
        if case.zero_stage is not None:
            from megallama.optimizer import DistributedDataParallel
            ddps = [DistributedDataParallel(c, zero_stage=case.zero_stage, bucket_size=3000) for c in chunks]
            losses = fb(STEPS[case.step], data, ddps, M, SEQ, MBS)
            for d in ddps:
                d.finish_grad_sync()
            allreduce_embedding_gradients(ddps)
            out[case.name] = dict(collect_pieces(ddps, losses, fb), layers=layers)
            continue
        with torch.set_grad_enabled(not case.forward_only):
            losses = fb(STEPS[case.step], data, chunks, M, SEQ, MBS, forward_only=case.forward_only)
        assert next(data, None) is None
        if not case.forward_only:
            finish_grads(chunks, False)
            allreduce_embedding_gradients(chunks)
        out[case.name] = dict(collect(chunks, losses, fb), layers=layers)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_run_cases, 2, CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_uneven_stages_equal_one_process(two_ranks, case):
    per_rank = {r: v[case.name] for r, v in two_ranks.items()}
    counts = list(case.counts) if case.counts else megatron_split(case.layers, 2, case.chunks, first=case.first,
                                                                  last=case.last)
    starts = [sum(counts[:k]) for k in range(len(counts))]
    for r in (0, 1):  # rank r builds parts r, r + 2, ...: exactly the global layer ids the split names
        assert per_rank[r]["layers"] == [list(range(starts[k], starts[k] + counts[k]))
                                         for k in range(r, len(counts), 2)]
    ref_losses, ref_grads = reference(tiny_config(case.layers, case.tied), case.microbatches, case.step)
    if case.forward_only:
        for r in per_rank.values():
            assert r["grads"] == []
        got = per_rank[1]["losses"]
        assert all(abs(g - e) <= 1e-5 * abs(e) for g, e in zip(got, ref_losses)) and len(got) == case.microbatches
        return
    check_against_reference(per_rank, ref_losses, ref_grads, case.microbatches, 2)


# ------------------------------------------------------------------ the flags, as a Megatron launch line gives them
BASE = ["--model", "tiny_llama3_50m", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--train-iters", "1", "--device", "cpu"]


def parse(layers, pp, *extra):
    return parse_args(BASE + ["--num-layers", str(layers), "--pipeline-model-parallel-size", str(pp), *extra],
                      world_size=pp)


@pytest.mark.parametrize("layers, pp, extra, counts", [
    (7, 2, ["--pipeline-model-parallel-layout", "Ett|t|t|tttL"], [2, 1, 1, 3]),
    (6, 2, ["--pipeline-model-parallel-layout", "Ett||t|tttL"], [2, 0, 1, 3]),  # an empty virtual stage
    (5, 2, ["--pipeline-model-parallel-layout", "E|tt|ttt|L"], [0, 2, 3, 0]),
    (6, 4, ["--pipeline-model-parallel-layout", "Et|ttt|t|tL"], [1, 3, 1, 1]),  # was refused: not cost-balanced
    (8, 2, ["--num-virtual-stages-per-pipeline-rank", "2", "--decoder-first-pipeline-num-layers", "2",
            "--decoder-last-pipeline-num-layers", "6"], [1, 3, 1, 3]),
    (14, 3, ["--num-virtual-stages-per-pipeline-rank", "2", "--decoder-first-pipeline-num-layers", "2"],
     [1, 3, 3, 1, 3, 3]),
    (6, 2, ["--num-virtual-stages-per-pipeline-rank", "2", "--account-for-embedding-in-pipeline-split",
            "--account-for-loss-in-pipeline-split"], [1, 2, 2, 1]),
    (6, 2, ["--num-layers-per-virtual-pipeline-stage", "1", "--account-for-embedding-in-pipeline-split",
            "--account-for-loss-in-pipeline-split"], [0, 1, 1, 1, 1, 1, 1, 0]),
    (3, 2, ["--account-for-embedding-in-pipeline-split"], [1, 2]),
    (1, 2, ["--account-for-embedding-in-pipeline-split"], [0, 1]),
])
def test_flags_resolve_to_megatrons_split(layers, pp, extra, counts):
    a = parse(layers, pp, *extra)
    assert a.pipeline_layer_counts == counts
    v = len(counts) // pp
    assert a.pipeline_schedule == ("interleaved" if v > 1 else "1f1b")
    assert a.virtual_pipeline_model_parallel_size == (v if v > 1 else None)


def test_llama31_405b_splits():
    """126 layers: pp 16 with 7 on the first and last rank; pp 8 x 8 chunks with the embedding and the loss counted
    as layers (128 = 8 x 8 x 2: the first and the last chunk hold one decoder layer)."""
    counts = megatron_split(126, 16, 1, first=7, last=7)
    assert counts == [7] + [8] * 14 + [7]
    counts = megatron_split(126, 8, 8, embedding=True, loss=True)
    assert counts == [1] + [2] * 62 + [1] and sum(counts) == 126
    with pytest.raises(ConfigError, match="6 must be a positive multiple of the 8 virtual stages per rank"):
        megatron_split(126, 8, 8, first=8, last=6)
    with pytest.raises(ConfigError, match="leave 110 layers for 6 other stages x 8 virtual stages"):
        megatron_split(126, 8, 8, first=8, last=8)


@pytest.mark.parametrize("layers, pp, extra, msg", [
    (8, 2, ["--num-virtual-stages-per-pipeline-rank", "2", "--decoder-first-pipeline-num-layers", "3"],
     "positive multiple of the 2 virtual stages per rank"),
    (8, 3, ["--num-virtual-stages-per-pipeline-rank", "2", "--decoder-first-pipeline-num-layers", "2"],
     "leave 6 layers for 2 other stages x 2 virtual stages, which must split evenly"),
    (8, 2, ["--num-layers-per-virtual-pipeline-stage", "2", "--decoder-first-pipeline-num-layers", "4"],
     "pass the chunks per rank as --num-virtual-stages-per-pipeline-rank"),
    (6, 2, ["--num-virtual-stages-per-pipeline-rank", "2", "--account-for-embedding-in-pipeline-split"],
     "6 layers \\+ 1 do not split evenly over 2 pipeline stages x 2 virtual stages"),
    (7, 2, ["--num-virtual-stages-per-pipeline-rank", "2", "--account-for-loss-in-pipeline-split",
            "--decoder-first-pipeline-num-layers", "2"], "both place layers; pass one"),
    (6, 2, ["--pipeline-model-parallel-layout", "|Ett|t|tttL"], "the first stage is empty"),
    (7, 2, ["--pipeline-model-parallel-layout", "Ett|t|t|tttL", "--pipeline-schedule", "1f1b"],
     "only --pipeline-schedule interleaved runs"),
])
def test_bad_combinations_are_one_line(layers, pp, extra, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse(layers, pp, *extra)
    assert "\n" not in str(e.value)


def test_parse_layout_keeps_embedding_or_loss_alone():
    assert parse_layout("E|(tt|)*4,L", 3, 8) == [0, 2, 2, 2, 2, 0]
    assert parse_layout("Et*3|L", 2, 3) == [3, 0]


def test_memory_estimate_uses_the_layout():
    """The estimate prices each rank's own layers and largest chunk: rank 1 of "Ett|t|t|tttL" holds 4 layers in
    chunks of 1 and 3, so it needs more than the even split's rank 1 (3-4 layers in chunks of 2)."""
    from megallama.memory import estimate_requirements
    from megallama.memory_cli import run
    from megallama.memory_stage import stage_layers
    from megallama.config import get_model_config
    cfg = get_model_config("llama3_8b")
    assert stage_layers(cfg, 2, layer_counts=[2, 1, 1, 3]) == [3, 4]
    kw = dict(model_config=cfg.replace(num_layers=8), num_gpus=2, pp=2, pipeline_schedule="interleaved",
              virtual_pipeline_stages=2, num_microbatches=4, sequence_length=1024, recommend=False)
    even = estimate_requirements("llama3_8b", **kw)
    uneven = estimate_requirements("llama3_8b", pipeline_layer_counts=[1, 1, 1, 5], **kw)
    assert uneven["layout"]["layers_on_worst_stage"] == 6 and even["layout"]["layers_on_worst_stage"] == 4
    assert uneven["stages"][1]["allocated_gb"] > even["stages"][1]["allocated_gb"]
    assert uneven["stages"][0]["allocated_gb"] < even["stages"][0]["allocated_gb"]
    est = run(["--model", "llama3_405b", "--tp", "8", "--pp", "8", "--gpus", "8", "--nodes", "8", "--seq-length",
               "8192", "--sequence-parallel", "--zero-stage", "1", "--recompute-granularity", "full",
               "--global-batch-size", "64", "--num-virtual-stages-per-pipeline-rank", "8",
               "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"])["estimate"]
    assert est["layout"]["pipeline_schedule"] == "interleaved"
    assert [est["stages"][s]["allocated_gb"] > 0 for s in range(8)] == [True] * 8
    layout = run(["--model", "llama3_405b", "--tp", "8", "--pp", "8", "--gpus", "8", "--nodes", "8", "--seq-length",
                  "8192", "--sequence-parallel", "--zero-stage", "1", "--recompute-granularity", "full",
                  "--global-batch-size", "64", "--pipeline-model-parallel-layout", "Et|(tt|)*62,tL"])["estimate"]
    assert layout["memory_per_gpu_gb"] == est["memory_per_gpu_gb"]  # the same split, given as a layout
