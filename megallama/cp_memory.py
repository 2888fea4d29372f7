"""Transient bytes of context-parallel attention (model/context_parallel.py), per rank, while one layer's attention
runs backward: the moment each --cp-comm-type holds the most beyond the layer's saved tensors (its forward holds
a subset of the same buffers on fewer saved bytes). Pure arithmetic; the CUDA path (bf16/fp16: flash kernels,
which take GQA's K/V as they are and expand dK/dV to the query heads inside their backward).

Per tp rank: b micro-batch, s = seq/cp local tokens, n = cp, hq = a/t query heads, hk = g/t kv heads, d head dim,
e compute bytes. KV = 2*e*b*s*hk*d (this rank's K and V), Q = e*b*s*hq*d (its queries), r = hq/hk.
- p2p (ring): two K/V blocks in flight (the one in hand and the one arriving) 2*KV; two dK/dV blocks in flight in
  fp32 (travelling with them) 2*(4/e)*KV; the fp32 dq accumulator (4/e)*Q; the kernel's dK/dV of its block with
  their expansion to the query heads (1 + r)*KV (r = 1: KV).
- allgather: the gathered K/V n*KV; their fp32 dK/dV accumulator (4/e)*n*KV; the first query chunk's fp32 dq
  (2/e)*Q; the late chunk's kernel over up to all n*s keys (rank 0): its dK/dV and their expansion (1 + r)*n*KV.
  The gathered K/V are not kept from the forward (gathered again, as TE does), so nothing lasts past the layer.
- a2a (Ulysses): the all-to-all's send and receive buffers and the sequence reorder of q, k and v (dq, dk, dv in
  backward): 3*(Q + KV') with KV' the K/V after repeating kv heads to a multiple of cp (hk % cp != 0).
- a2a+p2p (sizes A x B): the larger of the a2a term over A ranks and the ring's over B ranks on the a2a layout (the
  same bytes per rank: A times the tokens, 1/A of the heads). Not their sum: the all-to-alls run before and after
  the ring, whose backward reads the output grad already in the a2a layout (the sequence layout's is freed), and
  its dq/dk/dv go through the reorder and all-to-all only once its buffers are gone (measured on 4 CPU ranks,
  tests/test_memory_cp_a2a_p2p.py: the 2 x 2 backward holds what the ring alone holds).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from megallama.errors import ConfigError

COMM_TYPES = ("p2p", "a2a", "allgather", "a2a+p2p")  # megallama.model.context_parallel.COMM_TYPES (a test checks)


def _repeated_kv_heads(hk: int, hq: int, n: int) -> int:
    """kv heads after Ulysses' repeat (model/context_parallel.py ``_expand_kv_for_ulysses``)."""
    if hk % n == 0:
        return hk
    rep = n // math.gcd(hk, n)
    return hk * (hq // hk if hq % (hk * rep) else rep)


def check_cp_comm_type(comm_type: str, cp: int, hierarchical_sizes: Optional[Sequence[int]] = None) -> None:
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"context-parallel communication {comm_type!r} is not one of {', '.join(COMM_TYPES)}; "
                          "fix --cp-comm-type")
    if comm_type == "a2a+p2p" and cp > 1:
        sizes = list(hierarchical_sizes or [])
        if len(sizes) != 2 or min(sizes) < 2 or math.prod(sizes) != cp:
            raise ConfigError(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A B (a2a size, "
                              f"p2p size), both >= 2, with A x B = --context-parallel-size {cp}; got {sizes or None}")


def cp_attention_backward_bytes(b: int, s: int, hq: int, hk: int, d: int, e: int, cp: int, comm_type: str = "p2p",
                                hierarchical_sizes: Optional[Sequence[int]] = None) -> int:
    """Bytes the cp attention of one layer holds at its backward's peak on top of the layer's saved set (0 at
    cp 1); ``s`` is the local sequence (seq / cp), heads are per tp rank. See the module docstring."""
    check_cp_comm_type(comm_type, cp, hierarchical_sizes)
    if cp == 1:
        return 0
    kv, q = 2 * e * b * s * hk * d, e * b * s * hq * d
    r = hq // hk

    def ring(kv_bytes, q_bytes, ratio):
        return 2 * kv_bytes + 2 * (4 * kv_bytes // e) + 4 * q_bytes // e + (1 + ratio) * kv_bytes

    def ulysses(n):
        hk_rep = _repeated_kv_heads(hk, hq, n)
        return 3 * (q + 2 * e * b * s * hk_rep * d)

    if comm_type == "p2p":
        return ring(kv, q, r)
    if comm_type == "allgather":
        return cp * kv + 4 * cp * kv // e + 2 * q // e + (1 + r) * cp * kv
    if comm_type == "a2a":
        return ulysses(cp)
    a, _ = hierarchical_sizes
    hk_rep = _repeated_kv_heads(hk, hq, a)
    return max(ulysses(a), ring(2 * e * b * s * hk_rep * d, q, hq // hk_rep))
