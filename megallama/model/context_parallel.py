"""Attention over a sequence sharded across the context-parallel group: ring attention (p2p), Ulysses (a2a), the
K/V all-gather (allgather) or Ulysses inside groups and the ring across them (a2a+p2p), as Megatron's --cp-comm-type.

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
All-gather (Llama 3, TE's ``AttnFuncWithCPAndKVAllGather``): every rank gathers the K/V (kv heads) of the whole
sequence and each of its two query chunks ``j`` attends to the keys up to its own end in one bottom-right causal
block; in backward the K/V are gathered again (as TE: the gathered K/V live only during one layer's attention) and
dK/dV, summed in fp32 over the two chunks, are reduce-scattered home in the gradients' dtype (bf16 under --bf16).
a2a+p2p (``--hierarchical-context-parallel-sizes a b``): Ulysses over ``a`` adjacent cp ranks turns their zig-zag
chunks into the zig-zag chunks of a ``2b``-chunk split, which the ring then runs over the ``b`` ranks with the same
index in their a2a group (sub-groups registered with the grid: ``destroy_model_parallel`` drops them).
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
from megallama.mpu.grid_validation import hierarchical_cp_sizes_fit

COMM_TYPES = ("p2p", "a2a", "allgather", "a2a+p2p")
_COMM_TYPE = "p2p"  # the a2a+p2p sub-groups live with the grid's groups (mpu.context_parallel)


def single_comm_type(value) -> str:
    """--cp-comm-type as one string: Megatron's per-layer list is accepted when all its entries agree."""
    if isinstance(value, str):
        return value
    if len(set(value)) != 1:
        raise ConfigError(f"per-layer --cp-comm-type lists ({' '.join(value)}) are not supported; give one of "
                          "p2p, a2a, allgather or a2a+p2p for all layers")
    return value[0]


def set_context_parallel_comm_type(comm_type, hierarchical_sizes=None) -> None:
    """``p2p`` (ring attention, any head count), ``a2a`` (Ulysses all-to-all, heads per tp rank % cp == 0),
    ``allgather`` (K/V all-gather, any head count) or ``a2a+p2p`` (with ``hierarchical_sizes`` [a2a, p2p], whose
    product is cp; after ``initialize_model_parallel``, on every rank: it creates the sub-groups)."""
    global _COMM_TYPE
    comm_type = single_comm_type(comm_type)
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"context-parallel communication {comm_type!r} is not one of {COMM_TYPES}; "
                          "fix --cp-comm-type")
    _COMM_TYPE = comm_type
    if comm_type == "a2a+p2p":
        cp = ps.get_context_parallel_world_size()
        sizes = hierarchical_sizes
        if not hierarchical_cp_sizes_fit(sizes, cp):
            raise ConfigError(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A B (a2a size, "
                              f"p2p size), both >= 2, with A x B = --context-parallel-size {cp}; got {sizes}")
        cpc.new_hierarchical_groups(sizes[0])


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


def _check_two_chunks(q):
    if q.shape[1] % 2:
        raise ConfigError(f"local sequence length {q.shape[1]} is odd; context parallelism needs 2 equal chunks "
                          "per rank (--seq-length divisible by 2 x --context-parallel-size)")


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


def _zigzag_attention(function, gather_docs, q, k, v, document_ids, scale, backend, group) -> torch.Tensor:
    """Shared by the ring and the all-gather: [b, s, h, d] in and out, the documents gathered as ``function``
    reads them."""
    group = group if group is not None else ps.get_context_parallel_group()
    _check_two_chunks(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    docs = None
    if document_ids is not None:
        document_ids = document_ids.to(q.device)
        docs = gather_docs(document_ids, group)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    return function.apply(qh, kh, vh, document_ids, docs, scale, group, backend).transpose(1, 2)


def ring_attention(q, k, v, document_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   backend: str = "auto", group=None) -> torch.Tensor:
    """Zig-zag ring attention. q: [b, 2c, hq, d], k/v: [b, 2c, hkv, d] (this rank's chunks ``r``, ``2cp-1-r``),
    ``document_ids`` [b, 2c] the local slice -> [b, 2c, hq, d]."""
    return _zigzag_attention(_ZigZagRingAttention, cpc.all_gather_cp, q, k, v, document_ids, scale, backend, group)


def _rows(x, sl):
    return None if x is None else x[:, sl]


def _query_chunks(n: int, r: int, c: int):
    """Per local query chunk ``j`` (``r``, then ``2n-1-r``): its slice of the local sequence and the length of the
    natural-order key prefix it attends to, ``(j+1)c``: one bottom-right causal block (TE's per-chunk K/V range)."""
    for half, j in enumerate((r, 2 * n - 1 - r)):
        yield slice(half * c, (half + 1) * c), (j + 1) * c


class _AllGatherKVAttention(torch.autograd.Function):
    """q [b, hq, 2c, d], k/v [b, hkv, 2c, d] (this rank's zig-zag chunks), ``docs`` [b, 2cp*c] (natural order).

    As TE's ``AttnFuncWithCPAndKVAllGather``: forward gathers the K/V and runs one kernel per query chunk; only the
    local K/V are saved (the gathered ones are freed after the forward and gathered again in backward, so they
    never outlive one layer's attention); dK/dV add up over this rank's two chunks in fp32 and are reduce-scattered
    home in the gradients' dtype (TE's choice: an activation gradient, like SP's reduce-scatter in bf16)."""

    @staticmethod
    def forward(ctx, q, k, v, doc, docs, scale, group, backend):
        n, r, c = dist.get_world_size(group), dist.get_rank(group), q.shape[2] // 2
        outs, lses = [], []
        with _no_autocast(q.device.type):
            kv = cpc.gather_zigzag(torch.stack((k, v)), dim=3, group=group)  # [2, b, hkv, 2cp*c, d]
            for qs, keys in _query_chunks(n, r, c):
                o, l = block_attention_forward(q[:, :, qs], kv[0, :, :, :keys], kv[1, :, :, :keys], True,
                                               _allowed(_rows(doc, qs), _rows(docs, slice(0, keys))), scale, backend)
                outs.append(o)
                lses.append(l)
        out = torch.cat(outs, dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=2), doc, docs)
        ctx.scale, ctx.group, ctx.backend, ctx.n, ctx.r = scale, group, backend, n, r
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc, docs = ctx.saved_tensors
        dqs = []
        with _no_autocast(q.device.type):
            kv = cpc.gather_zigzag(torch.stack((k, v)), dim=3, group=ctx.group)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for qs, keys in _query_chunks(ctx.n, ctx.r, q.shape[2] // 2):
                dq_b, dk_b, dv_b = block_attention_backward(
                    dout[:, :, qs], q[:, :, qs], kv[0, :, :, :keys], kv[1, :, :, :keys], out[:, :, qs],
                    lse[:, :, qs].contiguous(), True, _allowed(_rows(doc, qs), _rows(docs, slice(0, keys))),
                    ctx.scale, ctx.backend)
                dqs.append(dq_b)
                dkv[0, :, :, :keys] += dk_b
                dkv[1, :, :, :keys] += dv_b
            del kv
            dkv = cpc.reduce_scatter_zigzag(dkv.to(k.dtype), dim=3, group=ctx.group)  # summed over the ranks
        return torch.cat(dqs, dim=2).to(q.dtype), dkv[0], dkv[1], None, None, None, None, None


def allgather_attention(q, k, v, document_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        backend: str = "auto", group=None) -> torch.Tensor:
    """K/V all-gather context parallelism: q [b, 2c, hq, d], k/v [b, 2c, hkv, d] (this rank's zig-zag chunks),
    ``document_ids`` [b, 2c] the local slice -> [b, 2c, hq, d]."""
    return _zigzag_attention(_AllGatherKVAttention, lambda d, g: cpc.gather_zigzag(d, dim=1, group=g), q, k, v,
                             document_ids, scale, backend, group)


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


def _inner_to_outer_zigzag(n: int, c: int, device) -> torch.Tensor:
    """Positions, in the a2a output (the ``n`` inner ranks' chunks ``(i, 2cp-1-i)`` in rank order), of the outer
    ring's zig-zag layout: the inner ranks' early chunks in rank order, then their late chunks in reverse."""
    early = [torch.arange(2 * i * c, (2 * i + 1) * c, device=device) for i in range(n)]
    late = [torch.arange((2 * i + 1) * c, (2 * i + 2) * c, device=device) for i in reversed(range(n))]
    return torch.cat(early + late)


def hierarchical_attention(q, k, v, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a2a+p2p: Ulysses over the a2a group, the zig-zag ring over the p2p group, Ulysses back (bshd layout)."""
    a2a, p2p = cpc.get_hierarchical_context_parallel_groups()
    n, hq = dist.get_world_size(a2a), q.shape[2]
    if hq % n:
        raise ConfigError(f"--cp-comm-type a2a+p2p needs the {hq} attention heads per tensor-parallel rank to be "
                          f"divisible by the a2a size {n} of --hierarchical-context-parallel-sizes; use p2p")
    k, v = _expand_kv_for_ulysses(k, v, hq, n)
    perm = _inner_to_outer_zigzag(n, q.shape[1] // 2, q.device)
    qf, kf, vf = (cpc.seq_to_heads(t, a2a).index_select(1, perm) for t in (q, k, v))
    docs = None
    if document_ids is not None:
        gathered = cpc.all_gather_cp(document_ids.to(q.device), a2a)  # [n, b, 2c]
        docs = gathered.transpose(0, 1).reshape(q.shape[0], -1).index_select(1, perm)
    out = ring_attention(qf, kf, vf, docs, group=p2p)
    return cpc.heads_to_seq(out.index_select(1, torch.argsort(perm)), a2a)


def context_parallel_attention(q, k, v, document_ids: Optional[torch.Tensor] = None,
                               comm_type: Optional[str] = None) -> torch.Tensor:
    """Causal GQA attention of this cp rank's zig-zag chunks (bshd layout, like ``core_attention``)."""
    comm_type = comm_type or _COMM_TYPE
    if comm_type == "a2a":
        return ulysses_attention(q, k, v, document_ids)
    if comm_type == "allgather":
        return allgather_attention(q, k, v, document_ids)
    if comm_type == "a2a+p2p":
        return hierarchical_attention(q, k, v, document_ids)
    return ring_attention(q, k, v, document_ids)
