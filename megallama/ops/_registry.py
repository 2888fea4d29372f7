"""Fake (meta) kernels and autograd formulas of the ``torch.ops.megallama`` ops defined in csrc/bindings.cpp.

With these, torch.compile traces the ops without a graph break, meta-device models run them, and autograd works
through ``torch.library`` rather than a Python ``autograd.Function``. Called once, after the library is loaded.
"""
from __future__ import annotations

import torch

_registered = False


def _rstd_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register_fakes(lib: str) -> None:
    fake = torch.library.register_fake

    @fake(f"{lib}::rms_norm_fwd")
    def _(x, weight, eps):
        return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x))

    @fake(f"{lib}::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)

    @fake(f"{lib}::rope_fwd")
    def _(x, cos, sin, inverse):
        return torch.empty_like(x)

    @fake(f"{lib}::rope_qk_fwd")
    def _(q, k, cos, sin, inverse):
        return torch.empty_like(q), torch.empty_like(k)

    @fake(f"{lib}::rope_")
    def _(x, cos, sin, inverse):
        return None

    @fake(f"{lib}::swiglu_fwd")
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @fake(f"{lib}::swiglu_bwd")
    def _(dy, gate, up):
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(up, memory_format=torch.contiguous_format))

    @fake(f"{lib}::swiglu_packed_fwd")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @fake(f"{lib}::swiglu_packed_bwd")
    def _(dy, gate_up):
        return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _register_autograd(lib: str) -> None:
    ops = torch.ops.megallama

    def rms_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    def rms_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = ops.rms_norm_bwd(dy, x, weight, rstd)
        return dx, dw, None

    torch.library.register_autograd(f"{lib}::rms_norm_fwd", rms_backward, setup_context=rms_setup)

    def rope_setup(ctx, inputs, output):
        _, cos, sin, inverse = inputs
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse

    def rope_backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return ops.rope_fwd(dy, cos, sin, not ctx.inverse), None, None, None

    torch.library.register_autograd(f"{lib}::rope_fwd", rope_backward, setup_context=rope_setup)

    def rope_qk_setup(ctx, inputs, output):
        _, _, cos, sin, inverse = inputs
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse

    def rope_qk_backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = ops.rope_qk_fwd(dq, dk, cos, sin, not ctx.inverse)
        return dq, dk, None, None, None

    torch.library.register_autograd(f"{lib}::rope_qk_fwd", rope_qk_backward, setup_context=rope_qk_setup)

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def swiglu_backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return ops.swiglu_bwd(dy, gate, up)

    torch.library.register_autograd(f"{lib}::swiglu_fwd", swiglu_backward, setup_context=swiglu_setup)

    def packed_backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return ops.swiglu_packed_bwd(dy, gate_up)

    torch.library.register_autograd(f"{lib}::swiglu_packed_fwd", packed_backward, setup_context=swiglu_setup)


def register() -> None:
    global _registered
    if _registered:
        return
    _register_fakes("megallama")
    _register_autograd("megallama")
    _registered = True
