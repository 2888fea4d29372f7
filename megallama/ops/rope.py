"""Rotary position embedding (HF "rotate_half" layout) incl. Llama 3.1 frequency scaling.

``apply_rope`` runs the fused kernel (csrc/rope.cpp, rope_cuda.cu) when available: fp32 math from the fp32 cos/sin
tables, so any frequency scheme is just another table; layouts (batch, seq, heads, dim) and (batch, heads, seq, dim) and
non-contiguous inputs are read in place; the backward is the inverse rotation.
"""
import math

import torch

from megallama.ops import _extension

_LAYOUTS = ("bshd", "bhsd")


def rope_frequencies(head_dim: int, theta: float, rope_scaling=None, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32; ``rope_scaling`` is a ``config.RopeScaling`` (Llama 3.1)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    if exponents.is_meta:  # a model built on meta: the shape is all (init computes the values); meta arithmetic
        return exponents   # goes through torch._refs, which imports torch._dynamo (~2 s in every process)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    if rope_scaling is None:
        return inv_freq
    factor, low, high = rope_scaling.factor, rope_scaling.low_freq_factor, rope_scaling.high_freq_factor
    old_ctx = rope_scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos/sin tables [..., seq, head_dim/2] in fp32 for the given (global) positions."""
    freqs = positions.float().unsqueeze(-1) * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [seq, head_dim/2] or [batch, seq, head_dim/2]."""
    d2 = x.shape[-1] // 2
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def _fusable(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    d = x.shape[-1]
    if x.dim() != 4 or d % 2 or cos.shape != sin.shape or cos.shape[-1] != d // 2 or cos.dim() not in (2, 3):
        return False
    if cos.requires_grad or sin.requires_grad or not x.is_floating_point():
        return False  # the kernel differentiates x only
    if x.device.type == "cuda" and d > 256:
        return False
    return _extension.use_fused(x, cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "bshd",
               inplace: bool = False) -> torch.Tensor:
    """Rotate x ([batch, seq, heads, head_dim], or [batch, heads, seq, head_dim] with ``layout="bhsd"``) by the
    angles whose cos/sin are given as [seq, head_dim/2] or [batch, seq, head_dim/2]. ``inplace`` overwrites x
    (inference only: x must not require grad) and returns it."""
    if layout not in _LAYOUTS:
        raise ValueError(f"apply_rope: layout {layout!r} is not one of {_LAYOUTS}")
    if inplace and torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("apply_rope: inplace=True needs a tensor that does not require grad; use inplace=False")
    xs = x.transpose(1, 2) if layout == "bhsd" else x  # the kernel and reference see [b, s, h, d]
    if _fusable(xs, cos, sin):
        table = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = cos.to(table), sin.to(table)
        if inplace:
            torch.ops.megallama.rope_(xs, cos, sin, False)
            return x
        out = torch.ops.megallama.rope_fwd(xs, cos, sin, False)
    else:
        out = apply_rope_reference(xs, cos, sin)
        if inplace:
            xs.copy_(out)
            return x
    return out.transpose(1, 2) if layout == "bhsd" else out


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "bshd"):
    """``(apply_rope(q, ...), apply_rope(k, ...))`` in one kernel launch (forward and backward): q and k of one
    attention layer share batch, seq, head_dim and the tables; their head counts may differ (GQA)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"apply_rope_qk: layout {layout!r} is not one of {_LAYOUTS}")
    qs, ks = (q.transpose(1, 2), k.transpose(1, 2)) if layout == "bhsd" else (q, k)
    if (q.dtype == k.dtype and qs.shape[:2] == ks.shape[:2] and qs.shape[-1] == ks.shape[-1]
            and _fusable(qs, cos, sin) and _fusable(ks, cos, sin)):
        table = torch.float64 if q.dtype == torch.float64 else torch.float32
        qo, ko = torch.ops.megallama.rope_qk_fwd(qs, ks, cos.to(table), sin.to(table), False)
        return (qo.transpose(1, 2), ko.transpose(1, 2)) if layout == "bhsd" else (qo, ko)
    return apply_rope(q, cos, sin, layout), apply_rope(k, cos, sin, layout)
