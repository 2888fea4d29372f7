"""Rotary position embedding (HF "rotate_half" layout) incl. Llama 3.1 frequency scaling."""
import math
from typing import Optional

import torch


def rope_frequencies(head_dim: int, theta: float, rope_scaling=None, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32; ``rope_scaling`` is a ``config.RopeScaling`` (Llama 3.1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rope_reference(x, cos, sin)
