"""PowerSGD's math on real gloo ranks (megallama/optimizer/compression_powersgd.py).

* At full rank one round is the exact average, and a rank whose P is square keeps no residual.
* At any rank, what was sent plus the mean residual is the mean input (error feedback loses nothing), and each
  rank's residual is a projection of its own matrix, so it stays bounded over many steps (the residual of PowerSGD
  against the approximation of the mean instead grows with the spread between ranks, step after step).
* In the training loop, full-rank PowerSGD on every matrix trains like uncompressed DDP.
"""
import torch
import torch.distributed as dist

from compression_harness import make, train
from dist_utils import run_distributed
from megallama.optimizer.compression import CompressionConfig
from megallama.optimizer.compression_powersgd import powersgd_round

SHAPES = [(3, 6, 4), (2, 5, 7), (1, 4, 4)]  # [batch, rows, cols]


def _mean(world):
    def all_reduce_mean(t):
        dist.all_reduce(t)
        t.div_(world)
    return all_reduce_mean


def _gather_mean(t, world):
    t = t.clone()
    dist.all_reduce(t)
    return t / world


def _max_diff(a, b):
    return float((a - b).abs().max())


def _rounds(rank, world):
    """Plain numbers back (the ranks check their tensors here): worst deviations from what each property says."""
    g = torch.Generator().manual_seed(100 + rank)
    mats = [torch.randn(*s, generator=g) for s in SHAPES]
    start = torch.Generator().manual_seed(7)  # the same start Q on every rank
    out = {}
    for r in ("full", 2):
        qs = [torch.randn(b, c, min(rows, c) if r == "full" else r, generator=start) for b, rows, c in SHAPES]
        dense = torch.randn(5, generator=g)
        dense_avg = dense.clone()  # averaged in place
        ps, new_qs, res = powersgd_round([m.clone() for m in mats], qs, _mean(world), dense_avg)
        approx = [torch.bmm(p, q.transpose(1, 2)) for p, q in zip(ps, new_qs)]
        means = [_gather_mean(m, world) for m in mats]
        out[r] = {
            "exact": max(_max_diff(a, m) for a, m in zip(approx, means)),
            "square_residual": max(float(e.abs().max()) for (_, rows, cols), e in zip(SHAPES, res) if rows <= cols),
            "conserved": max(_max_diff(a + _gather_mean(e, world), m) for a, e, m in zip(approx, res, means)),
            "projection": max(float(e.norm() / m.norm()) for e, m in zip(res, mats)),
            "dense": _max_diff(dense_avg, _gather_mean(dense, world)),
            "same_q": max(_max_diff(q, _gather_mean(q, world)) for q in new_qs)}
    # error feedback over many rank-1 steps, ranks far apart: each residual stays within its own matrix
    q = [torch.randn(1, 8, 1, generator=start)]
    err = torch.zeros(1, 8, 8)
    worst = 0.0
    for _ in range(40):
        m = torch.randn(1, 8, 8, generator=g) + 3.0 * rank + err
        _, q, (err,) = powersgd_round([m.clone()], q, _mean(world))
        worst = max(worst, float(err.norm() / m.norm()))
    out["steps"] = (worst, float(err.norm()))
    return out


def test_full_rank_is_exact_and_error_feedback_loses_nothing():
    for rank, out in run_distributed(_rounds, 2).items():
        assert out["full"]["exact"] < 1e-5 and out["full"]["square_residual"] < 1e-5, (rank, out)
        for r in ("full", 2):  # sent + mean residual = mean input; residual a projection; the same on every rank
            o = out[r]
            assert o["conserved"] < 1e-5 and o["projection"] <= 1 + 1e-6, (rank, r, o)
            assert o["dense"] < 1e-6 and o["same_q"] < 1e-6, (rank, r, o)
        worst, final = out["steps"]
        assert worst <= 1 + 1e-6 and final < 50.0, (rank, out["steps"])


def _full_rank_training(rank, world):
    ddp, opt, _ = make(0)
    plain, _ = train(ddp, opt, 8)
    ddp, opt, comps = make(0, CompressionConfig("powersgd", rank=256, min_compression_rate=0.0, warmup_steps=2))
    full, rep = train(ddp, opt, 8)
    compressed = sum(len(g["offs"]) for st in comps[0].state.values() for g in st["groups"])
    return plain, full, compressed, sum(1 for p in ddp.module.parameters() if p.dim() >= 2)


def test_full_rank_powersgd_trains_like_uncompressed():
    for rank, (plain, full, compressed, matrices) in run_distributed(_full_rank_training, 2).items():
        assert compressed == matrices  # every matrix went through PowerSGD
        for a, b in zip(plain, full):
            assert abs(a - b) <= 1e-5 * abs(a), (rank, plain, full)


def _startup_lines(rank, world):
    import contextlib
    import io
    out = {}
    for r in (4, 1000):
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            make(0, CompressionConfig("powersgd", rank=r, warmup_steps=3))
        out[r] = (so.getvalue(), se.getvalue())
    return out


def test_a_rank_that_compresses_nothing_is_said():
    """--gradient-compression-rank at or above the matrices' sizes (or LoRA adapters of rank <= r) sent every
    gradient exact and logged a 1.0x ratio without a word: now a start-up line says what is compressed, and a
    warning what is not."""
    out = run_distributed(_startup_lines, 2)[0]
    log, err = out[4]
    assert "gradient compression powersgd: exact for the first 3 optimizer steps, then rank-4 products for 16 of " \
        "21 parameters" in log, log
    assert "warning" not in err, err
    log, err = out[1000]
    assert "rank-1000 products for 0 of 21 parameters" in log, log
    assert "warning: --gradient-compression powersgd at --gradient-compression-rank 1000 compresses none of the " \
        "gradients" in err, err
