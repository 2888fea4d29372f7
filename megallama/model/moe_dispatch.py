"""Token dispatch for mixture-of-experts: sort by expert, all-to-all over the expert-parallel group, grouped GEMM.

The hot path has no Python loop over experts. Tokens (one row per (token, choice) assignment) are sorted by expert
id, so each expert's rows are contiguous; with expert parallelism the sorted rows are exchanged with one
``mpu.mappings.all_to_all`` (rank j owns experts [j*E_l, (j+1)*E_l)) and regrouped by local expert. The three expert
projections then run as grouped matmuls over those contiguous groups: ``torch._grouped_mm`` where it exists for the
device/dtype, else one ``bmm`` over groups padded to the largest group.
"""
from __future__ import annotations

from typing import Optional

import torch


# ---------------------------------------------------------------- grouped matmul
def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(d * x.element_size() % 16 for d in w.shape[1:]):  # every row stride must be 16-byte aligned
        return False
    if x.device.type == "cpu":  # eager runs fp32 too; the meta kernel torch.compile traces with takes bf16 only
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    if x.device.type == "cuda":  # CUTLASS grouped GEMM: bf16 on Hopper and newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class _ContiguousGrad(torch.autograd.Function):
    """``_grouped_mm``'s backward rejects expanded (stride-0) gradients, e.g. from ``out.sum()``."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped_mm: Optional[bool] = None
                   ) -> torch.Tensor:
    """Rows ``x[offs[e-1]:offs[e]] @ w[e].T`` for each group e; x: [N, in] sorted by group, w: [G, out, in],
    counts: [G] rows per group (a CPU or device int tensor summing to N). Returns [N, out]."""
    if use_grouped_mm is None:
        use_grouped_mm = _grouped_mm_supported(x, w)
    if use_grouped_mm:
        offs = torch.cumsum(counts.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
    return _padded_bmm(x, w, counts)


def _padded_bmm(x, w, counts):
    """One bmm over groups padded to the largest group (scatter rows in, gather rows out)."""
    G, n = w.shape[0], x.shape[0]
    counts = counts.to(x.device, torch.long)
    if n == 0:
        return x.new_zeros(0, w.shape[1])
    cap = int(counts.max())
    group = torch.repeat_interleave(torch.arange(G, device=x.device), counts, output_size=n)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=x.device) - starts[group]
    buf = x.new_zeros(G, cap, x.shape[1])
    buf = buf.index_put((group, pos), x)
    out = torch.bmm(buf, w.transpose(1, 2))
    return out[group, pos]


# ---------------------------------------------------------------- permutation
def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_experts] int64 assignments per expert. Not ``bincount``: its output shape depends on the data, which
    splits a compiled graph; a scatter-add into a fixed-size vector is the same count."""
    ids = expert_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int, capacity: Optional[int] = None,
                   preference: Optional[torch.Tensor] = None):
    """expert_ids: [N] (flattened token-major (token, choice) assignments). Returns (order, counts): ``order`` the
    kept assignment indices sorted by expert, ``counts`` [num_experts] kept rows per expert. Within an expert the
    rows follow ``preference`` (a permutation of the N assignments, most wanted first; default their own order),
    and with ``capacity`` each expert keeps the first ``capacity`` of them."""
    if preference is None:
        order = torch.argsort(expert_ids, stable=True)
    else:
        order = preference[torch.argsort(expert_ids[preference], stable=True)]
    counts = expert_counts(expert_ids, num_experts)
    if capacity is not None:
        sorted_e = expert_ids[order]
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(order.numel(), device=order.device) - starts[sorted_e]
        order = order[pos < capacity]
        counts = counts.clamp(max=capacity)
    return order, counts


def drop_preference(top_p: torch.Tensor, batch: int, policy: str) -> torch.Tensor:
    """The order in which an over-full expert keeps its assignments (Megatron's ``--moe-token-drop-policy``).
    top_p: [b*s, k] weights of tokens laid out [b, s]. ``position``: earliest first in Megatron's [s, b] token order
    (sequence position, then sample), so the last positions are dropped; ``probs``: highest weight first, ties in
    that position order."""
    n, k = top_p.shape
    by_position = torch.arange(n * k, device=top_p.device).view(batch, n // batch, k).transpose(0, 1).reshape(-1)
    if policy == "position":
        return by_position
    if policy != "probs":
        raise ValueError(f"unknown token drop policy {policy!r}; use probs or position")
    p = top_p.detach().reshape(-1)[by_position]
    return by_position[torch.argsort(-p, stable=True)]


def padded_slots(counts: torch.Tensor, size: int) -> torch.Tensor:
    """Where each row of groups sorted by id goes when every group is padded to ``size`` rows: group e's rows to
    [e*size, e*size + counts[e]) (Megatron's ``--moe-pad-expert-input-to-capacity``)."""
    n = int(counts.sum())
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=n)
    starts = torch.cumsum(counts, 0) - counts
    return group * size + torch.arange(n, device=counts.device) - starts[group]
