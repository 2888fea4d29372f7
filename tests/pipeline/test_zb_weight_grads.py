"""ZB-H1's W pass runs only the weight-gradient GEMMs that B queued: every linear layer's backward runs once per
microbatch, as under 1F1B, and every stage, the last included, leaves work for W. (A W that re-ran the backward
for the weight grads ran each twice on the middle stages: B had computed the input grads for the stage before.) Equivalence with one process is in
test_pipeline_equivalence.py."""
import torch

from dist_utils import run_distributed
from megallama.mpu import layers as L
from megallama.mpu import parallel_state as ps
from megallama.mpu import weight_grad_store
from megallama.pipeline import build_model_chunks, get_forward_backward_func
from pp_harness import MBS, SEED, SEQ, forward_step, make_batches, tiny_config

M = 4


def _count_backwards(rank, world):
    ps.initialize_model_parallel(1, world)
    calls = {"n": 0}
    for fn_cls in (L._ColumnParallelLinears, L._RowParallelGEMM):
        orig = fn_cls.backward

        def counted(ctx, *grads, _orig=orig):
            calls["n"] += 1
            return _orig(ctx, *grads)
        fn_cls.backward = staticmethod(counted)
    applied = {"n": 0}
    orig_apply = weight_grad_store.apply

    def counted_apply(pending):
        applied["n"] += bool(pending)
        orig_apply(pending)
    weight_grad_store.apply = counted_apply
    out = {}
    for schedule in ("1f1b", "zb-h1"):
        calls["n"] = applied["n"] = 0
        chunks = build_model_chunks(tiny_config(6), seed=SEED, schedule=schedule)
        fb = get_forward_backward_func(world, schedule)
        fb(forward_step, iter(make_batches(M)), chunks, M, SEQ, MBS)
        w_ops = applied["n"]  # W ops that ran queued GEMMs
        grads = {n: p.grad.clone() for n, p in chunks[0].named_parameters()}
        out[schedule] = (calls["n"], w_ops, grads)
    return out


def test_zb_h1_runs_each_linear_backward_once():
    res = run_distributed(_count_backwards, 3)
    for rank, r in res.items():
        (n_1f1b, _, g_1f1b), (n_zb, w_ops, g_zb) = r["1f1b"], r["zb-h1"]
        assert n_1f1b > 0 and n_zb == n_1f1b, (rank, n_1f1b, n_zb)
        assert g_zb.keys() == g_1f1b.keys()
        for n in g_1f1b:
            assert torch.allclose(g_zb[n], g_1f1b[n], rtol=1e-5, atol=1e-7), n
    assert [res[r]["zb-h1"][1] for r in sorted(res)] == [M] * len(res)  # one W with work per microbatch and stage
    assert all(res[r]["1f1b"][1] == 0 for r in res)
