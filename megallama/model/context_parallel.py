"""Attention over a sequence sharded across the context-parallel group: ring attention (p2p) or Ulysses (a2a).

Each cp rank holds zig-zag chunks ``r`` and ``2cp-1-r`` of the sequence (``mpu.context_parallel``). Ring: K/V
(kv heads only: GQA-aware) travel around the cp group while each rank attends its queries to the block in hand;
the next block's transfer overlaps this block's compute, and the partial results merge by their logsumexps. Under
zig-zag every step costs every rank the same (``c`` = chunk length):

- step 0, the rank's own K/V: causal attention of its 2c queries to its 2c keys (the two chunks are in global
  order, so plain causal masking is exact);
- K/V from a rank ``src < r``: all queries see the first (early) K/V chunk only;
- K/V from a rank ``src > r``: only the late query chunk sees them, both chunks fully.

Backward runs the ring again; dK/dV accumulate (fp32) on a buffer that travels with the K/V and reaches its owner
after the last step. Ulysses swaps the sequence shard for a head shard with one all-to-all, runs ordinary attention
over the full sequence, and swaps back; it needs the (tp-local) heads divisible by cp.
Packed sequences (``document_ids``): the blocks also mask out pairs from different documents.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.model.block_attention import block_attention_backward, block_attention_forward, merge_blocks
from megallama.mpu import context_parallel as cpc
from megallama.mpu import parallel_state as ps

COMM_TYPES = ("p2p", "a2a")
_COMM_TYPE = "p2p"


def set_context_parallel_comm_type(comm_type: str) -> None:
    """``p2p`` (ring attention, any head count) or ``a2a`` (Ulysses all-to-all, heads per tp rank % cp == 0)."""
    global _COMM_TYPE
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"context-parallel communication {comm_type!r} is not one of {COMM_TYPES}; fix --cp-comm-type")
    _COMM_TYPE = comm_type


def get_context_parallel_comm_type() -> str:
    return _COMM_TYPE


def _allowed(q_doc, k_doc):
    return None if q_doc is None else q_doc[:, :, None] == k_doc[:, None, :]


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def _ring_steps(ring, kv, docs_all, n: int, r: int):
    """Per ring step: (source rank, the K/V block in hand, its document ids or None), the rank's own first; the
    next block's transfer overlaps the caller's work on this one."""
    for step in range(n):
        pending = ring.start(kv, tag=0) if step + 1 < n else None
        src = (r - step) % n
        yield src, kv, (None if docs_all is None else docs_all[src])
        if pending is not None:
            kv = pending.wait()


class _ZigZagRingAttention(torch.autograd.Function):
    """q [b, hq, 2c, d], k/v [b, hkv, 2c, d] (this rank's zig-zag chunks) -> out [b, hq, 2c, d]."""

    @staticmethod
    def forward(ctx, q, k, v, doc, docs_all, scale, group, backend):
        ring = cpc.RingExchange(group)
        n, r = dist.get_world_size(group), dist.get_rank(group)
        c = q.shape[2] // 2
        out = lse = None
        with _no_autocast(q.device.type):
            for src, kv, kd in _ring_steps(ring, torch.stack((k, v)), docs_all, n, r):
                if src == r:
                    o, l = block_attention_forward(q, kv[0], kv[1], True, _allowed(doc, kd), scale, backend)
                    out, lse = o.float(), l
                elif src < r:
                    o, l = block_attention_forward(q, kv[0, :, :, :c], kv[1, :, :, :c], False,
                                                   _allowed(doc, None if kd is None else kd[:, :c]), scale, backend)
                    out, lse = merge_blocks(out, lse, o, l)
                else:
                    o, l = block_attention_forward(q[:, :, c:], kv[0], kv[1], False,
                                                   _allowed(None if doc is None else doc[:, c:], kd), scale, backend)
                    out[:, :, c:], lse[:, :, c:] = merge_blocks(out[:, :, c:], lse[:, :, c:], o, l)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc, docs_all)
        ctx.scale, ctx.group, ctx.backend, ctx.n, ctx.r = scale, group, backend, n, r
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc, docs_all = ctx.saved_tensors
        scale, backend, n, r = ctx.scale, ctx.backend, ctx.n, ctx.r
        ring = cpc.RingExchange(ctx.group)
        c = q.shape[2] // 2
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_pending = None
        with _no_autocast(q.device.type):
            for src, kv, kd in _ring_steps(ring, torch.stack((k, v)), docs_all, n, r):
                if src == r:
                    dq_b, dk_b, dv_b = block_attention_backward(dout, q, kv[0], kv[1], out, lse, True,
                                                                _allowed(doc, kd), scale, backend)
                    dq += dq_b
                    dkv = torch.stack((dk_b, dv_b))
                elif src < r:
                    dq_b, dk_b, dv_b = block_attention_backward(
                        dout, q, kv[0, :, :, :c], kv[1, :, :, :c], out, lse, False,
                        _allowed(doc, None if kd is None else kd[:, :c]), scale, backend)
                    dq += dq_b
                    dkv = dkv_pending.wait()
                    dkv[0, :, :, :c] += dk_b
                    dkv[1, :, :, :c] += dv_b
                else:
                    dq_b, dk_b, dv_b = block_attention_backward(
                        dout[:, :, c:], q[:, :, c:], kv[0], kv[1], out[:, :, c:], lse[:, :, c:].contiguous(), False,
                        _allowed(None if doc is None else doc[:, c:], kd), scale, backend)
                    dq[:, :, c:] += dq_b
                    dkv = dkv_pending.wait()
                    dkv[0] += dk_b
                    dkv[1] += dv_b
                dkv_pending = ring.start(dkv, tag=1)  # on to the next rank; home after the last step
        dkv = dkv_pending.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, document_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   backend: str = "auto", group=None) -> torch.Tensor:
    """Zig-zag ring attention. q: [b, 2c, hq, d], k/v: [b, 2c, hkv, d] (this rank's chunks ``r``, ``2cp-1-r``),
    ``document_ids`` [b, 2c] the local slice -> [b, 2c, hq, d]."""
    group = group if group is not None else ps.get_context_parallel_group()
    if q.shape[1] % 2:
        raise ConfigError(f"local sequence length {q.shape[1]} is odd; context parallelism needs 2 equal chunks "
                          "per rank (--seq-length divisible by 2 x --context-parallel-size)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    docs_all = None
    if document_ids is not None:
        document_ids = document_ids.to(q.device)
        docs_all = cpc.all_gather_cp(document_ids)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = _ZigZagRingAttention.apply(qh, kh, vh, document_ids, docs_all, scale, group, backend)
    return out.transpose(1, 2)


def _expand_kv_for_ulysses(k, v, hq: int, cp: int):
    """Repeat kv heads (each in place, as GQA's mapping wants) until cp divides their number."""
    hkv = k.shape[2]
    if hkv % cp == 0:
        return k, v
    rep = cp // math.gcd(hkv, cp)
    if hq % (hkv * rep):
        rep = hq // hkv
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def ulysses_attention(q, k, v, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All-to-all (Ulysses) context parallelism: q [b, 2c, hq, d], k/v [b, 2c, hkv, d] -> [b, 2c, hq, d]."""
    from megallama.model.attention import core_attention
    cp = ps.get_context_parallel_world_size()
    hq = q.shape[2]
    if hq % cp:
        raise ConfigError(f"all-to-all context parallelism needs the {hq} attention heads per tensor-parallel rank "
                          f"to be divisible by --context-parallel-size {cp}; use --cp-comm-type p2p")
    k, v = _expand_kv_for_ulysses(k, v, hq, cp)
    seq = q.shape[1] * cp
    perm = cpc.zigzag_to_natural(seq, cp, device=q.device)
    inv = torch.argsort(perm)
    qf, kf, vf = (cpc.seq_to_heads(t).index_select(1, perm) for t in (q, k, v))
    docs = None
    if document_ids is not None:
        gathered = cpc.all_gather_cp(document_ids.to(q.device))  # [cp, b, 2c]
        docs = gathered.transpose(0, 1).reshape(q.shape[0], seq).index_select(1, perm)
    out = core_attention(qf, kf, vf, document_ids=docs)
    return cpc.heads_to_seq(out.index_select(1, inv))


def context_parallel_attention(q, k, v, document_ids: Optional[torch.Tensor] = None,
                               comm_type: Optional[str] = None) -> torch.Tensor:
    """Causal GQA attention of this cp rank's zig-zag chunks (bshd layout, like ``core_attention``)."""
    comm_type = comm_type or _COMM_TYPE
    if comm_type == "a2a":
        return ulysses_attention(q, k, v, document_ids)
    return ring_attention(q, k, v, document_ids)
