"""Attention of one (query block, key/value block) pair that also returns the logsumexp, forward and backward as
plain functions (no autograd): ring attention merges the blocks of a row with their logsumexps and runs each
block's backward with the *merged* output and logsumexp, which gives the exact gradient (as flash attention's
backward does for its tiles).

Layout [b, heads, seq, head_dim]; GQA: q has ``g`` heads per kv head (head ``i`` uses kv head ``i // g``).
``causal`` is flash attention's bottom-right-aligned causal mask (the queries are the last ``sq`` positions of the
``sk`` keys, sq <= sk: the all-gather's query chunk against the keys up to it, in one call; for square blocks the
same as SDPA's top-left mask); ``allowed`` ([b, sq, sk] bool, True = attend) adds any other mask (documents of
packed sequences). Returns lse [b, hq, sq] in fp32 (-inf on rows that see nothing).

Backends: ``math`` (exact, any device, fp32 math: the CPU path and the oracle), ``sdpa_cpu`` (torch's CPU flash
kernel), ``flash`` and ``efficient`` (torch's CUDA flash / memory-efficient kernels; the latter takes masks and
fp32). ``auto`` picks flash on CUDA for bf16/fp16 without a mask, efficient for the rest on CUDA, math on CPU.
The environment variable ``MEGALLAMA_CP_ATTENTION`` overrides ``auto``. The flash kernel takes GQA's K/V as they
are (its backward sums the query heads' dK/dV itself); the others get K/V repeated to the query heads.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

aten = torch.ops.aten
BACKENDS = ("auto", "math", "sdpa_cpu", "flash", "efficient")
_NO_RNG = torch.zeros((), dtype=torch.int64)  # philox seed/offset: read by the CUDA kernels only with dropout


def select_backend(q: torch.Tensor, allowed: Optional[torch.Tensor], backend: str = "auto") -> str:
    if backend == "auto":
        backend = os.environ.get("MEGALLAMA_CP_ATTENTION", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"block attention backend {backend!r} is not one of {BACKENDS}; fix MEGALLAMA_CP_ATTENTION")
    if backend != "auto":
        return backend
    if q.device.type != "cuda":
        return "math"
    if allowed is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return "flash"
    return "efficient"


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _mask(allowed, causal, sq, sk, device):
    """[b or 1, sq, sk] bool of the allowed (query, key) pairs, or None for no mask at all."""
    m = None
    if causal:  # bottom-right: query i is position sk - sq + i
        m = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq).unsqueeze(0)
    if allowed is not None:
        m = allowed if m is None else (allowed & m)
    return m


# ---------------------------------------------------------------- math (exact)
def _scores(q, k, causal, allowed, scale):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * sq, d)
    s = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [b, hkv, g*sq, sk]
    m = _mask(allowed, causal, sq, sk, q.device)
    if m is not None:
        s = s.view(b, hkv, g, sq, sk).masked_fill(~m[:, None, None], float("-inf")).view(b, hkv, g * sq, sk)
    return qf, s


def _probs(s, lse):
    """exp(s - lse) with fully masked rows (lse = -inf) giving 0, not NaN."""
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - safe.unsqueeze(-1))


def _math_forward(q, k, v, causal, allowed, scale):
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    _, s = _scores(q, k, causal, allowed, scale)
    lse = torch.logsumexp(s, dim=-1)  # [b, hkv, g*sq]
    out = torch.matmul(_probs(s, lse), v.float())
    return out.reshape(b, hq, sq, d).to(q.dtype), lse.reshape(b, hq, sq)


def _math_backward(dout, q, k, v, out, lse, causal, allowed, scale):
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf, s = _scores(q, k, causal, allowed, scale)
    p = _probs(s, lse.float().reshape(b, hkv, g * sq))
    do = dout.float().reshape(b, hkv, g * sq, d)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.float().transpose(-1, -2))
    delta = (do * out.float().reshape(b, hkv, g * sq, d)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, k.float()).reshape(b, hq, sq, d)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    return dq, dk, dv


# ---------------------------------------------------------------- torch's kernels (equal heads: expand GQA)
def _expand(k, v, hq):
    g = hq // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _fold(dk, dv, hkv):
    b, hq, sk, d = dk.shape
    if hq == hkv:
        return dk, dv
    return dk.view(b, hkv, hq // hkv, sk, d).sum(2), dv.view(b, hkv, hq // hkv, sk, d).sum(2)


def _additive(m, b, hq, sq, sk, dtype, align: int = 1):
    """Float bias [b, hq, sq, sk] (0 / -inf) from a bool mask [b or 1, sq, sk]; rows padded to ``align`` elements
    (mem-efficient kernels need aligned strides), then sliced. The batch is expanded too: the mem-efficient
    kernel checks the bias's batch size (a causal-only mask has one)."""
    skp = -(-sk // align) * align
    bias = torch.zeros(m.shape[0], 1, sq, skp, dtype=dtype, device=m.device)[..., :sk]
    bias.masked_fill_(~m[:, None], float("-inf"))
    return bias.expand(b, hq, sq, sk)


def _bias(allowed, causal, q, sk, align: int = 1):
    """The float mask the CPU-flash and memory-efficient kernels take, or None when their own causal flag (top-left:
    square blocks only) or no mask says it all."""
    hq, sq = q.shape[1], q.shape[2]
    if allowed is None and (not causal or sq == sk):
        return None
    return _additive(_mask(allowed, causal, sq, sk, q.device), q.shape[0], hq, sq, sk, q.dtype, align)


def _kernel_forward(backend, q, k, v, causal, allowed, scale):
    hq, sk = q.shape[1], k.shape[2]
    if backend == "flash":  # GQA as is; its causal is bottom-right
        if allowed is not None:
            raise ValueError("the flash backend takes no mask; use 'efficient' for document masks")
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse.float()
    ke, ve = _expand(k, v, hq)
    if backend == "sdpa_cpu":
        bias = _bias(allowed, causal, q, sk)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, ke, ve, 0.0, causal and bias is None, attn_mask=bias, scale=scale)
        return out, lse.float()
    bias = _bias(allowed, causal, q, sk, 16)
    out, lse = aten._scaled_dot_product_efficient_attention(
        q, ke, ve, bias, True, 0.0, causal and bias is None, scale=scale)[:2]
    return out, lse[..., :q.shape[2]].float()  # the kernel pads lse rows to a multiple of 32


def _kernel_backward(backend, dout, q, k, v, out, lse, causal, allowed, scale):
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dout, out = dout.to(q.dtype).contiguous(), out.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    if backend == "flash":  # dense (not varlen): no cumulative lengths (None = undefined, as forward gives)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, sq, sk, 0.0, causal, _NO_RNG, _NO_RNG, scale=scale)
        return dq.float(), dk.float(), dv.float()  # dK/dV already per kv head
    ke, ve = _expand(k, v, hq)
    if backend == "sdpa_cpu":
        bias = _bias(allowed, causal, q, sk)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, ke, ve, out, lse, 0.0, causal and bias is None, attn_mask=bias, scale=scale)
    else:
        bias = _bias(allowed, causal, q, sk, 16)
        pad = -(-sq // 32) * 32 - sq
        lse = F.pad(lse, (0, pad)).contiguous() if pad else lse
        # The kernel reads ``out`` as [b, sq, hq, d] contiguous (its o_strideM is hq * d whatever the strides), the
        # layout its forward returns; a merged ring output is [b, hq, sq, d] contiguous (bf16 dq was NaN on H200).
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, ke, ve, bias, out, lse, _NO_RNG, _NO_RNG, 0.0, [True, True, True, False],
            causal and bias is None, scale=scale)
    dk, dv = _fold(dk.float(), dv.float(), hkv)
    return dq.float(), dk, dv


# ---------------------------------------------------------------- front doors
def block_attention_forward(q, k, v, causal: bool, allowed: Optional[torch.Tensor] = None,
                            scale: Optional[float] = None, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [b, hq, sq, d] in q's dtype, lse [b, hq, sq] fp32). Rows that see no key give out 0, lse -inf."""
    scale = _default_scale(q, scale)
    backend = select_backend(q, allowed, backend)
    if backend == "math":
        return _math_forward(q, k, v, causal, allowed, scale)
    out, lse = _kernel_forward(backend, q, k, v, causal, allowed, scale)
    if allowed is not None:  # rows that see no key: kernels leave NaN or lse 0 (CPU flash) there
        seen = _mask(allowed, causal, q.shape[2], k.shape[2], q.device).any(-1)[:, None]  # [b, 1, sq]
        out = torch.where(seen.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
    return out, lse


def block_attention_backward(dout, q, k, v, out, lse, causal: bool, allowed: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None, backend: str = "auto"):
    """(dq [b, hq, sq, d], dk, dv [b, hkv, sk, d]) in fp32, given the *final* ``out`` and ``lse`` of the rows
    (after merging every block they attend to): the exact gradient of this block's share."""
    scale = _default_scale(q, scale)
    backend = select_backend(q, allowed, backend)
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, causal, allowed, scale)
    return _kernel_backward(backend, dout, q, k, v, out, lse, causal, allowed, scale)


def merge_blocks(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Online softmax: combine a row's partial result (``out`` fp32, finite ``lse``) with another block's."""
    new = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new).unsqueeze(-1) + block_out.float() * torch.exp(block_lse - new).unsqueeze(-1)
    return out, new
