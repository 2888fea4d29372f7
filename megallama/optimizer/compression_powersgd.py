"""PowerSGD (Vogels et al. 2019) as a DDP comm hook: ``--gradient-compression powersgd``.

Each >= 2-D gradient M (+ its error) of a bucket becomes P Q^T of rank r in one power-iteration step:
P = M Q, all-reduce, orthonormalise, Q = M^T P, all-reduce; Q is the next step's start (warm start), so the
subspace keeps improving across steps. Matrices of one shape are batched. Tensors that rank r would not shrink
``min_compression_rate``-fold (1-D norms; PyTorch's powerSGD_hook rule) ride exact in the P all-reduce.

Error feedback keeps, per rank, the part of its M outside span(P): M - P Q_local^T with this rank's Q before the
all-reduce (Vogels et al., Algorithm 2). That residual is a projection of M, so it stays bounded; M minus the
approximation of the *mean* (what PyTorch's hook keeps) adds M - mean(M), a per-rank random walk across steps.
Both leave the same mean residual, so the averaged gradients (and the training) are the same.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megallama.optimizer.compression import GradientCompressor
from megallama.optimizer.distributed import hook_reduces


def powersgd_round(mats: Sequence[torch.Tensor], qs: Sequence[torch.Tensor],
                   all_reduce_mean: Callable[[torch.Tensor], None], dense: Optional[torch.Tensor] = None
                   ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """One PowerSGD step over batches of matrices, the same call on every rank.

    ``mats[i]`` [B, rows, cols]: this rank's matrices (gradient + error), overwritten with this rank's residuals;
    ``qs[i]`` [B, cols, r]: the start, equal on every rank. ``dense`` (flat fp32) is averaged exactly, in place, in
    the P all-reduce. Returns (P, Q, residuals): P Q^T is the rank-r approximation of the rank mean of ``mats``,
    Q the next start, residuals ``mats`` themselves. Nothing of the matrices' size is allocated."""
    ps = [torch.bmm(m, q) for m, q in zip(mats, qs)]
    flat = torch.cat([p.reshape(-1) for p in ps] + ([dense] if dense is not None else []))
    if flat.numel():
        all_reduce_mean(flat)
    off = 0
    for i, p in enumerate(ps):  # orthonormal columns, the same on every rank (same input, same kernel)
        ps[i] = torch.linalg.qr(flat[off:off + p.numel()].view_as(p)).Q
        off += p.numel()
    if dense is not None:
        dense.copy_(flat[off:])
    if not ps:
        return [], [], []
    local = [torch.bmm(m.transpose(1, 2), p) for m, p in zip(mats, ps)]  # Q_local = M^T P
    for m, p, q in zip(mats, ps, local):
        m.baddbmm_(p, q.transpose(1, 2), alpha=-1.0)  # residual M - P Q_local^T, in place
    flat = torch.cat([q.reshape(-1) for q in local])
    all_reduce_mean(flat)
    new_qs, off = [], 0
    for q in local:
        new_qs.append(flat[off:off + q.numel()].view_as(q))
        off += q.numel()
    return ps, new_qs, list(mats)


class PowerSGDCompressor(GradientCompressor):
    def plan(self, bucket) -> Tuple[Dict[tuple, List[int]], List[Tuple[int, int]]]:
        """The bucket's matrices sent as rank-r products, by (rows, cols, r): their offsets; and the (offset,
        numel) of the tensors sent exact: 1-D, or not shrunk ``min_compression_rate``-fold at rank r (a rank at
        or above a matrix's smaller dimension never is: it is sent as it is, the rank is not clamped)."""
        groups: Dict[tuple, List[int]] = {}
        dense = []
        for off, shape in self.param_views(bucket):
            n = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 1
            cols = n // max(rows, 1)
            r = min(self.config.rank, rows, cols)
            if len(shape) >= 2 and rows * cols >= self.config.min_compression_rate * r * (rows + cols):
                groups.setdefault((rows, cols, r), []).append(off)
            elif n:
                dense.append((off, n))
        return groups, dense

    def num_compressed(self) -> int:
        return sum(len(offs) for b in self.ddp.layout.buckets if hook_reduces(b)
                   for offs in self.plan(b)[0].values())

    def summary(self, comps) -> str:
        n = sum(c.num_compressed() for c in comps)
        total = sum(len(b.params) for c in comps for b in c.ddp.layout.buckets if hook_reduces(b))
        c = self.config
        return (f"rank-{c.rank} products for {n} of {total} parameters (1-D ones and matrices rank {c.rank} would "
                f"not shrink {c.min_compression_rate:g}x are sent exact)")

    def init_state(self, bucket, data):
        groups, dense = self.plan(bucket)
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + bucket.index)
        out = []
        for (rows, cols, r), offs in sorted(groups.items()):
            out.append({"offs": offs, "rows": rows, "cols": cols,
                        "q": torch.randn(len(offs), cols, r, generator=gen).to(data.device),
                        "error": torch.zeros(len(offs), rows, cols, device=data.device)})
        return {"groups": out, "dense": dense}

    @staticmethod
    def _views(data, g):
        return [data[o:o + g["rows"] * g["cols"]].view(g["rows"], g["cols"]) for o in g["offs"]]

    def compress(self, bucket, data, st):
        groups = st["groups"]
        for g in groups:  # M = error + G, built in the error buffer (which then keeps the residual)
            for e, v in zip(g["error"], self._views(data, g)):
                e.add_(v)
        dense = torch.cat([data[o:o + n].float() for o, n in st["dense"]]) if st["dense"] else None
        ps, qs, _ = powersgd_round([g["error"] for g in groups], [g["q"] for g in groups], self.all_reduce_mean,
                                   dense)
        off = 0
        for o, n in st["dense"]:
            data[o:o + n].copy_(dense[off:off + n])
            off += n
        for g, p, q in zip(groups, ps, qs):
            g["q"] = q  # warm start
            for v, pi, qi in zip(self._views(data, g), p, q):  # the approximation straight into the bucket
                if v.dtype == pi.dtype:
                    torch.mm(pi, qi.t(), out=v)
                else:
                    v.copy_(pi @ qi.t())
