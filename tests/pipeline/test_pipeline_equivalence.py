"""Every schedule, with TP (incl. SP) and DP, against the single-process run (fp32, gloo CPU ranks).

Each fixture spawns its ranks once and runs many cases in them (re-initialising the grid per layout), so the
whole file costs two process launches. A case compares every rank's local grads and the last stage's
per-microbatch losses to the whole model run without pipelining: 1e-5 relative.
"""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from dist_utils import run_distributed
from megallama.mpu import parallel_state as ps
from megallama.pipeline import allreduce_embedding_gradients, build_model_chunks, get_forward_backward_func
from pp_harness import (MBS, SEED, SEQ, STEPS, check_against_reference, collect, collect_pieces, finish_grads,
                        make_batches, reference, tiny_config)


@dataclass(frozen=True)
class Case:
    schedule: str
    pp: int
    tp: int = 1
    layers: int = 4
    tied: bool = False
    microbatches: int = 4
    sp: bool = False
    layers_per_virtual_stage: Optional[int] = None
    step: str = "per_token"
    forward_only: bool = False
    zero_stage: Optional[int] = None  # wrap the chunks in the project's DDP/ZeRO (grads checked in its shards)
    overlap: bool = False  # DDP's overlap_grad_reduce: buckets reduce as soon as their last grads arrive
    first: Optional[int] = None  # uneven stages: --decoder-first/last-pipeline-num-layers (what Megatron's
    last: Optional[int] = None  # --account-for-embedding/loss-in-pipeline-split and a layout become)

    @property
    def id(self):
        return (f"{self.schedule}-pp{self.pp}" + (f"-tp{self.tp}" if self.tp > 1 else "") + ("-sp" if self.sp else "")
                + ("-tied" if self.tied else "") + (f"-{self.step}" if self.step != "per_token" else "")
                + ("-eval" if self.forward_only else "") + (f"-zero{self.zero_stage}" if self.zero_stage is not None
                                                             else "") + ("-overlap" if self.overlap else "")
                + (f"-L{self.layers}" if self.first or self.last else "")
                + (f"-first{self.first}" if self.first else "") + (f"-last{self.last}" if self.last else ""))


def _run_cases(rank, world, cases):
    out = {}
    layout = None
    for case in cases:
        if layout != (case.tp, case.pp):
            ps.initialize_model_parallel(case.tp, case.pp)
            layout = (case.tp, case.pp)
        cfg = tiny_config(case.layers, case.tied)
        chunks = build_model_chunks(cfg, seed=SEED, sequence_parallel=case.sp, schedule=case.schedule,
                                    num_layers_per_virtual_stage=case.layers_per_virtual_stage,
                                    first_stage_num_layers=case.first, last_stage_num_layers=case.last)
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        M = case.microbatches
        data = iter(make_batches(M * dp, cfg.vocab_size)[dpr * M:(dpr + 1) * M])
        fb = get_forward_backward_func(case.pp, case.schedule)
        if case.zero_stage is not None:  # the loop's path: DDP/ZeRO wrappers, then the pipeline's sums
            from megallama.optimizer import DistributedDataParallel
            ddps = [DistributedDataParallel(c, zero_stage=case.zero_stage, bucket_size=3000,
                                            overlap_grad_reduce=case.overlap) for c in chunks]
            losses = fb(STEPS[case.step], data, ddps, M, SEQ, MBS)
            for d in ddps:
                d.finish_grad_sync()
            allreduce_embedding_gradients(ddps)
            out[case.id] = collect_pieces(ddps, losses, fb)
            continue
        with torch.set_grad_enabled(not case.forward_only):
            losses = fb(STEPS[case.step], data, chunks, M, SEQ, MBS, forward_only=case.forward_only)
        assert next(data, None) is None  # every microbatch consumed exactly once
        if not case.forward_only:
            finish_grads(chunks, case.sp)
            allreduce_embedding_gradients(chunks)
        if case.forward_only:
            assert all(p.grad is None for c in chunks for p in c.parameters())
        out[case.id] = collect(chunks, losses, fb)
    return out


TWO = [Case("1f1b", 2), Case("gpipe", 2, tied=True), Case("interleaved", 2, tied=True, layers_per_virtual_stage=1),
       Case("chimera", 2, tied=True), Case("chimera", 2), Case("zb-h1", 2), Case("1f1b", 2, tied=True, step="fused"),
       Case("interleaved", 2, layers_per_virtual_stage=1, microbatches=3, forward_only=True),
       # uneven stages, every non-interleaved schedule (interleaved cuts equal chunks)
       Case("1f1b", 2, layers=5, first=1), Case("gpipe", 2, tied=True, first=3), Case("zb-h1", 2, layers=5, last=1),
       Case("chimera", 2, layers=5, tied=True, first=2)]
FOUR = [Case("1f1b", 4, layers=8, microbatches=6, tied=True), Case("gpipe", 4, layers=8, microbatches=6),
        Case("interleaved", 4, layers=8, microbatches=6, tied=True, layers_per_virtual_stage=1),
        Case("chimera", 4, layers=8, microbatches=6, tied=True), Case("zb-h1", 4, layers=8, microbatches=6),
        Case("1f1b", 2, tp=2), Case("1f1b", 2, tp=2, sp=True, tied=True),
        Case("interleaved", 2, tp=2, sp=True, layers_per_virtual_stage=1),
        Case("chimera", 2, tp=2, sp=True, tied=True, step="fused"), Case("zb-h1", 2, tp=2, sp=True, tied=True),
        Case("1f1b", 2, tied=True), Case("chimera", 2), Case("zb-h1", 2, tied=True),  # from here: pp2 x dp2
        Case("chimera", 2, tied=True, zero_stage=0), Case("chimera", 2, tied=True, zero_stage=2),
        Case("chimera", 2, tied=True, zero_stage=3),
        # ZB-H1's last B and last W both reduce (the grads B gives, then the queued weight grads)
        Case("zb-h1", 2, tied=True, zero_stage=0, overlap=True), Case("zb-h1", 2, zero_stage=1, overlap=True),
        Case("zb-h1", 2, tied=True, zero_stage=3, overlap=True),
        # uneven stages at pp 4 ([1, 3, 3, 1]: both ends accounted for; [3, 2, 2, 2]; [2, 2, 2, 3]; 7 layers,
        # [1, 2, 2, 2]); Megatron's rule: the rest splits evenly over the other ranks
        Case("1f1b", 4, layers=8, microbatches=6, tied=True, first=1, last=1),
        Case("zb-h1", 4, layers=9, microbatches=6, first=3), Case("chimera", 4, layers=9, microbatches=6, tied=True,
                                                                   last=3),
        Case("gpipe", 4, layers=7, microbatches=6, first=1)]


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_run_cases, 2, TWO)


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_run_cases, 4, FOUR)


_REFS = {}


def _check(results, case):
    dp = 1 if case.pp * case.tp == len(results) else len(results) // (case.pp * case.tp)
    key = (case.layers, case.tied, case.microbatches * dp, case.step)
    if key not in _REFS:
        _REFS[key] = reference(tiny_config(case.layers, case.tied), case.microbatches * dp, case.step)
    ref_losses, ref_grads = _REFS[key]
    per_rank = {r: v[case.id] for r, v in results.items()}
    check_against_reference(per_rank, ref_losses, ref_grads, case.microbatches, case.pp)
    return per_rank


@pytest.mark.parametrize("case", TWO, ids=lambda c: c.id)
def test_two_stages(two_ranks, case):
    per_rank = _check(two_ranks, case)
    if case.schedule == "1f1b" and not case.forward_only:
        # the runner's own count of stored activations: p - stage
        assert [per_rank[r]["peak"] for r in (0, 1)] == [2, 1]


@pytest.mark.parametrize("case", FOUR, ids=lambda c: c.id + ("-dp2" if c.pp * c.tp == 2 else ""))
def test_four_ranks(four_ranks, case):
    per_rank = _check(four_ranks, case)
    if case.schedule == "1f1b" and case.pp == 4:
        assert [per_rank[r]["peak"] for r in range(4)] == [4, 3, 2, 1]
