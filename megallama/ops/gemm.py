"""``gemm_accum_fp32_(out, a, b)``: out (fp32 [M, K]) += a^T b for a [N, M] and b [N, K], accumulated in fp32.

The weight gradient of a chunked or micro-batched backward (grad_output^T input, summed over chunks) wants an fp32
sum of 16-bit products. ``(a.t() @ b).float()`` then ``+=`` writes a 16-bit [M, K] product (one rounding per
chunk), copies it to fp32 and adds it: three passes over [M, K] besides the GEMM. The fused path is one GEMM with
beta = 1 and an fp32 C (csrc/gemm_accum.cpp, Megatron's ``wgrad_gemm_accum_fp32``): on the 128K-vocabulary head
of tiny_llama3_150m those passes were 11 % of an H100 step.

Paths, in order: the csrc op (CUDA where it was built with cuBLAS; CPU always, as fp32 math); torch's own
``addmm(..., out_dtype=float32, out=out)`` where this torch accepts an fp32 ``self`` with 16-bit operands (probed
once per device); else, on CUDA, the 16-bit product and an add (the least memory), and on CPU the reference.
"""
from __future__ import annotations

import functools

import torch

from megallama.ops import _extension

_addmm_out_dtype_ok: dict = {}


def gemm_accum_fp32_reference(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """The math: products of the 16-bit values, summed in fp32 (no 16-bit rounding of the product)."""
    out.addmm_(a.t().float(), b.float())


@functools.lru_cache(maxsize=None)
def _cuda_kernel_built() -> bool:
    """Fixed once the library is loaded (only asked after ``use_fused_op``, which loads it): cached, since the head
    asks once per chunk."""
    return _extension.has_op("gemm_accum_cuda_built") and bool(torch.ops.megallama.gemm_accum_cuda_built())


def addmm_out_dtype_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(c32, a16.t(), b16, out_dtype=fp32, out=c32)`` accumulates correctly here (CUDA only;
    torch 2.11 requires ``self`` to have the operands' dtype, later versions may not: probed, not assumed)."""
    key = str(device)
    if key not in _addmm_out_dtype_ok:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(96, 80, device=device, generator=g).to(torch.bfloat16)
                b = torch.randn(96, 40, device=device, generator=g).to(torch.bfloat16)
                c = torch.randn(80, 40, device=device, generator=g)
                ref = c + a.float().t() @ b.float()
                torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
                ok = bool(torch.allclose(c, ref, rtol=1e-3, atol=1e-3))
            except Exception:  # noqa: BLE001 - no out_dtype overload, or stricter dtype checks
                ok = False
        _addmm_out_dtype_ok[key] = ok
    return _addmm_out_dtype_ok[key]


def gemm_accum_path(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> str:
    """Which path ``gemm_accum_fp32_`` takes for these tensors: "same-dtype", "fused", "addmm-out-dtype",
    "product-and-add" or "reference" (for tests and the benchmark log)."""
    if a.dtype == out.dtype:
        return "same-dtype"
    if _extension.use_fused_op("gemm_accum_fp32_", out, a, b) and (out.device.type != "cuda" or _cuda_kernel_built()):
        return "fused"
    if out.device.type == "cuda":
        return "addmm-out-dtype" if addmm_out_dtype_works(out.device) else "product-and-add"
    return "reference"


def gemm_accum_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a^T b, in place. ``out``: contiguous [M, K]; ``a`` [N, M] and ``b`` [N, K] of one floating dtype,
    16-bit with an fp32 ``out`` (operands of ``out``'s own dtype take a plain ``addmm_``)."""
    if a.dtype != b.dtype or a.dim() != 2 or b.dim() != 2 or tuple(out.shape) != (a.shape[1], b.shape[1]) or \
            a.shape[0] != b.shape[0] or (a.dtype != out.dtype and out.dtype != torch.float32):
        raise ValueError(f"gemm_accum_fp32_: expected fp32 out [M, K], a [N, M], b [N, K] of one dtype; got out "
                         f"{out.dtype} {tuple(out.shape)}, a {a.dtype} {tuple(a.shape)}, b {b.dtype} {tuple(b.shape)}")
    path = gemm_accum_path(out, a, b)
    if path == "same-dtype":
        out.addmm_(a.t(), b)
    elif path == "fused":
        torch.ops.megallama.gemm_accum_fp32_(out, a, b)
    elif path == "addmm-out-dtype":
        torch.addmm(out, a.t(), b, out_dtype=torch.float32, out=out)
    elif path == "product-and-add":
        out += a.t() @ b
    else:
        gemm_accum_fp32_reference(out, a, b)
