"""Gradient-accumulation fusion: the weight-gradient GEMM adds ``g^T x`` straight into ``param.main_grad``.

Without it a linear's backward writes a 16-bit [out, in] weight gradient, and the DDP wrapper's hook reads it back
and adds it into the fp32 ``main_grad``: two extra passes over every weight per microbatch (146 fp32 adds, 5.7 ms
of a 144 ms Llama-3.2-1B step on an H100). Fused, one cuBLAS GEMM with beta = 1 and an fp32 C does both, and the
product is summed in fp32 instead of rounded to 16 bits first (``ops.gemm_accum_fp32_``; Megatron's
``--gradient-accumulation-fusion``).

Autograd still needs a gradient for the weight, or the wrapper's post-accumulate hook would never fire and the
weight's bucket would never count as ready (no early, overlapped reduction), so the GEMM Functions return an
uninitialised tensor (no kernel) and mark the parameter ``grad_added_to_main_grad``; the hook then drops it instead
of adding it. As in Megatron.

A parameter that another op also differentiates (a tied embedding: lookup + output layer) is left out: autograd
sums both gradients into one ``.grad`` before the hook, so dropping the placeholder would drop the lookup's part.
It applies where it is exact and cheap: a leaf weight that is the Function's own input (no autocast copy in
between), a contiguous fp32 ``main_grad`` (ZeRO 0/1, or any stage at dp = 1), 16-bit operands, and the csrc op's
CUDA kernel (on CPU only when a test asks, since the CPU op works on fp32 copies). Not inside ``torch.compile``:
a traced backward keeps the GEMM but not the mark, so the hook would add the placeholder. ``--no-gradient-
accumulation-fusion`` or ``--no-fused-kernels`` turns it off.
"""
from __future__ import annotations

from typing import Optional

import torch

from megallama.ops.gemm import gemm_accum_fp32_, gemm_accum_path

_enabled = True
_allow_cpu = False


def set_gradient_accumulation_fusion(enabled: bool, allow_cpu: bool = False) -> None:
    global _enabled, _allow_cpu
    _enabled, _allow_cpu = bool(enabled), bool(allow_cpu)


def fusable_main_grad(param: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """``param.main_grad`` when a weight-gradient GEMM on ``device`` may sum into it (the checks every GEMM path
    shares: ``main_grad_target`` here, the fp8 GEMMs of ``mpu.fp8_linear``), else None."""
    if not _enabled or param is None or torch.compiler.is_compiling():  # a traced backward would drop the mark
        return None
    if not getattr(param, "allow_grad_accum_fusion", True):  # used twice in the graph (a tied embedding)
        return None
    target = getattr(param, "main_grad", None)
    if target is None or target.dtype != torch.float32 or not target.is_contiguous():
        return None
    return target if device.type == "cuda" or _allow_cpu else None


def main_grad_target(param: Optional[torch.Tensor], g: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``param.main_grad`` when ``g^T x`` can be summed into it by the GEMM itself, else None."""
    target = fusable_main_grad(param, g.device)
    if target is None or g.dtype not in (torch.bfloat16, torch.float16) or x.dtype != g.dtype:
        return None
    return target if gemm_accum_path(target, g, x) == "fused" else None


def added_to_main_grad(param: torch.Tensor) -> torch.Tensor:
    """Mark ``param``'s gradient as already in ``main_grad``; returns the placeholder autograd hands the weight."""
    param.grad_added_to_main_grad = True
    return torch.empty_like(param)


def accumulate_weight_grad(param: torch.Tensor, target: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``target += g^T x`` (flattened over tokens); returns the placeholder gradient autograd hands the weight."""
    gemm_accum_fp32_(target, g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
    return added_to_main_grad(param)


def take_grad_added_to_main_grad(param: torch.Tensor) -> bool:
    """For the wrapper's hook: True (and the mark cleared) when ``param.grad`` is only a placeholder."""
    if getattr(param, "grad_added_to_main_grad", False):
        param.grad_added_to_main_grad = False
        return True
    return False
