"""SwiGLU activation: silu(gate) * up, from two tensors or from one packed ``[..., 2f]`` projection output.

The fused kernel (csrc/swiglu.cpp, swiglu_cuda.cu) reads the operands in place through row strides, computes in fp32
with one rounding, and recomputes silu in the backward instead of saving it.
"""
import torch
import torch.nn.functional as F

from megallama.ops import _extension


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if (gate.shape == up.shape and gate.dtype == up.dtype and gate.dim() >= 1 and gate.is_floating_point()
            and _extension.use_fused(gate, up)):
        return torch.ops.megallama.swiglu_fwd(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up = cat([gate, up], -1)`` (a fused gate/up projection), without splitting it."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: last dim {gate_up.shape[-1]} must be even (cat of gate and up)")
    if gate_up.dim() >= 1 and gate_up.is_floating_point() and _extension.use_fused(gate_up):
        return torch.ops.megallama.swiglu_packed_fwd(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)
