"""Gradient-compression kernels: 1-bit sign packing with a per-chunk scale, and top-k sparsification, both with
error feedback, plus their unpacking (csrc/compression.cpp, onebit_cuda.cu, topk_cuda.cu; formats in
csrc/compression.h).

Error feedback: ``error`` (fp32, one entry per element, updated in place) is added to ``x`` before compressing and
keeps what the message did not carry, ``error <- x + error - decompress(message)``; so the running sum of the
decompressed messages tracks the running sum of the inputs, with a residual that stays bounded.

* ``onebit_pack(x, error, chunk_size) -> (packed uint8 [ceil(n/8)], scales fp32 [ceil(n/chunk_size)])``: bit
  ``i % 8`` of byte ``i // 8`` is 1 when ``c_i >= 0``; the chunk's scale is its mean ``|c|`` (the scale that
  minimises ``||c - scale * sign(c)||``). 32x fewer bytes than fp32, plus one fp32 per chunk.
* ``topk_pack(x, error, k) -> (values fp32 [k], indices int32 [k])``: the ``k`` largest ``|c|`` (ties to the lower
  index) in ascending index order; 8 bytes per kept element.
* ``*_unpack`` accept one message or ``[rows, ...]`` stacked messages (e.g. all-gathered from every rank) and return
  ``alpha * sum over rows`` as a dense fp32 vector, summing rows in order (the kernels equal the references
  bit for bit).
"""
from __future__ import annotations

from typing import Tuple

import torch

from megallama.ops import _extension

DEFAULT_CHUNK_SIZE = 2048  # elements per 1-bit scale: 1/64 bit of scale overhead per element


def _check_error(x: torch.Tensor, error: torch.Tensor, op: str) -> None:
    if error.dtype != torch.float32 or not error.is_contiguous() or error.numel() != x.numel():
        raise ValueError(f"{op}: error must be a contiguous float32 tensor with x's {x.numel()} elements, got "
                         f"{error.dtype} {tuple(error.shape)}")
    if error.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but error on {error.device}")


def _check_chunk(chunk_size: int, op: str) -> None:
    if chunk_size <= 0 or chunk_size % 8:
        raise ValueError(f"{op}: chunk_size {chunk_size} must be a positive multiple of 8")


# ------------------------------------------------------------------------------------------------ references
def onebit_pack_reference(x: torch.Tensor, error: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    c = x.reshape(-1).float() + error.view(-1)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.empty(0, device=x.device)
    nchunks = -(-n // chunk_size)
    padded = torch.zeros(nchunks * chunk_size, dtype=torch.float32, device=x.device)
    padded[:n] = c
    counts = torch.full((nchunks,), float(chunk_size), device=x.device)
    counts[-1] = n - (nchunks - 1) * chunk_size if n else chunk_size
    scales = padded.abs().view(nchunks, chunk_size).sum(1, dtype=torch.float64).div(counts).float()
    pos = c >= 0
    s = scales.repeat_interleave(chunk_size)[:n]
    error.view(-1).copy_(c - torch.where(pos, s, -s))
    bits = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=x.device)
    bits[:n] = pos.to(torch.uint8)
    weights = (1 << torch.arange(8, device=x.device, dtype=torch.int32)).to(torch.uint8)
    packed = (bits.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)
    return packed, scales


def onebit_unpack_reference(packed: torch.Tensor, scales: torch.Tensor, numel: int,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, alpha: float = 1.0) -> torch.Tensor:
    rows = packed.shape[0] if packed.dim() == 2 else 1
    packed, scales = packed.reshape(rows, -1), scales.reshape(rows, -1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, :numel].bool()
    out = torch.zeros(numel, dtype=torch.float32, device=packed.device)
    for r in range(rows):
        s = scales[r].repeat_interleave(chunk_size)[:numel]
        out += torch.where(bits[r], s, -s)
    return out if alpha == 1.0 else out.mul_(alpha)


def topk_pack_reference(x: torch.Tensor, error: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    c = error.view(-1)
    c += x.reshape(-1).float()
    order = torch.sort(c.abs(), descending=True, stable=True).indices[:k]  # stable: ties to the lower index
    idx = torch.sort(order).values
    values = c[idx].clone()
    c[idx] = 0.0
    return values, idx.to(torch.int32)


def topk_unpack_reference(values: torch.Tensor, indices: torch.Tensor, numel: int,
                          alpha: float = 1.0) -> torch.Tensor:
    rows = values.shape[0] if values.dim() == 2 else 1
    values, indices = values.reshape(rows, -1), indices.reshape(rows, -1)
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    for r in range(rows):
        out.index_add_(0, indices[r].long(), values[r])
    return out if alpha == 1.0 else out.mul_(alpha)


# ------------------------------------------------------------------------------------------------ front doors
def onebit_pack(x: torch.Tensor, error: torch.Tensor,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sign-compress ``x + error`` with one fp32 scale per ``chunk_size`` elements; ``error`` gets the residual."""
    _check_error(x, error, "onebit_pack")
    _check_chunk(chunk_size, "onebit_pack")
    if x.is_floating_point() and _extension.use_fused_op("onebit_pack", x, error):
        return torch.ops.megallama.onebit_pack(x, error, chunk_size)
    return onebit_pack_reference(x, error, chunk_size)


def onebit_unpack(packed: torch.Tensor, scales: torch.Tensor, numel: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  alpha: float = 1.0) -> torch.Tensor:
    """``alpha *`` the sum of the decompressed messages (``packed`` [rows, ceil(numel/8)] or one message)."""
    _check_chunk(chunk_size, "onebit_unpack")
    rows = packed.shape[0] if packed.dim() == 2 else 1
    if packed.dtype != torch.uint8 or packed.numel() != rows * (-(-numel // 8)) or \
            scales.numel() != rows * (-(-numel // chunk_size)):
        raise ValueError(f"onebit_unpack: packed {tuple(packed.shape)} {packed.dtype} / scales {tuple(scales.shape)} "
                         f"do not describe {rows} message(s) of {numel} elements in chunks of {chunk_size}")
    if _extension.use_fused_op("onebit_unpack", packed, scales):
        return torch.ops.megallama.onebit_unpack(packed, scales.float(), numel, chunk_size, float(alpha))
    return onebit_unpack_reference(packed, scales.float(), numel, chunk_size, alpha)


def topk_pack(x: torch.Tensor, error: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest ``|x + error|`` (values, int32 indices ascending); ``error`` keeps the rest."""
    _check_error(x, error, "topk_pack")
    if not 0 <= k <= x.numel():
        raise ValueError(f"topk_pack: k {k} must be in [0, {x.numel()}]")
    if x.numel() >= 2 ** 31:
        raise ValueError(f"topk_pack: {x.numel()} elements do not fit int32 indices; compress smaller buckets")
    if x.is_floating_point() and _extension.use_fused_op("topk_pack", x, error):
        return torch.ops.megallama.topk_pack(x, error, k)
    return topk_pack_reference(x, error, k)


def topk_unpack(values: torch.Tensor, indices: torch.Tensor, numel: int, alpha: float = 1.0) -> torch.Tensor:
    """``alpha *`` the sum of the sparse messages (``[rows, k]`` or ``[k]``) as a dense fp32 vector."""
    if values.shape != indices.shape or values.dim() not in (1, 2):
        raise ValueError(f"topk_unpack: values {tuple(values.shape)} and indices {tuple(indices.shape)} must be the "
                         "same [k] or [rows, k]")
    values, indices = values.float(), indices.to(torch.int32)
    if _extension.use_fused_op("topk_unpack", values, indices):
        return torch.ops.megallama.topk_unpack(values, indices, numel, float(alpha))
    return topk_unpack_reference(values, indices, numel, alpha)
