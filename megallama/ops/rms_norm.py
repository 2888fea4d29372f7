"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 (as HF Llama and Megatron do).

``rms_norm`` runs the fused kernel (csrc/rms_norm.cpp, rms_norm_cuda.cu: one pass forward saving only the inverse
rms, one pass backward) when it is available, else the reference; both give the reference's dtypes and rounding.
"""
import torch

from megallama.ops import _extension

_CUDA_MAX_HIDDEN = 16384  # the CUDA kernel keeps a row in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused kernel; the caller checked ``_extension.use_fused``. A weight of another dtype than x's is
    promoted to fp32 first: the kernel then computes exactly the reference's promoted product."""
    if weight.dtype != x.dtype:
        weight = weight.float()
    return torch.ops.megallama.rms_norm_fwd(x, weight, float(eps))[0]


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        return False
    if torch.float64 in (x.dtype, weight.dtype) and x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda" and x.shape[-1] > _CUDA_MAX_HIDDEN:
        return False
    return x.is_floating_point() and _extension.use_fused(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _fusable(x, weight):
        return rms_norm_fused(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
