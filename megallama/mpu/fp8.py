"""FP8 tensor math for the tensor-parallel linears: Megatron's ``--fp8-format`` with tensorwise current scaling.

Each GEMM operand is cast to fp8 with one scale per tensor, computed from the tensor itself just before the cast
(current scaling: ``scale = fp8_max / amax / 2**margin``; Transformer Engine's Float8CurrentScaling, torchao's
dynamic Float8Linear). Activations and weights use e4m3; gradients e5m2 under ``hybrid`` (range over precision),
e4m3 under ``e4m3``. ``torch._scaled_mm`` multiplies two fp8 operands with their dequantisation scales
(``1/scale``) and writes bf16/fp32, so nothing here depends on Transformer Engine or torchao.

Tensor and context parallelism: a tensor split over tp or cp ranks (a weight shard, a row-parallel input, a
sequence-parallel activation, a column-parallel output gradient; under cp every activation and output gradient, as
each cp rank holds a slice of the sequence) must be scaled by the amax of the *whole* tensor, or tp 2 / cp 2 would
quantise differently from one process: ``reduce_amax`` all-reduces (MAX) the local amaxes over the tp x cp group
(the cp group for tensors replicated over tp), all of a layer's in one call.

Delayed scaling (``--fp8-recipe delayed``, Megatron's default) takes the scales from an amax history instead:
``mpu.fp8_delayed``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FORMATS = ("e4m3", "hybrid")
_EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale (its fp8 image is zeros either way)
ALIGN = 16  # cuBLASLt's fp8 rule: both dims of the second operand and the inner dim are multiples of 16


RECIPES = ("delayed", "tensorwise")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")


@dataclass(frozen=True)
class Fp8Recipe:
    """What a linear needs to run in fp8 (hashable: torch.compile treats it as a constant). ``recipe``:
    tensorwise (current scaling) or delayed (scales from an amax history of ``amax_history_len`` steps, reduced
    by ``amax_compute_algo``: Transformer Engine's DelayedScaling)."""
    format: str = "hybrid"
    margin: int = 0
    recipe: str = "tensorwise"
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"fp8 format {self.format!r} is not one of {FORMATS}; use --fp8-format hybrid or e4m3")
        if self.recipe not in RECIPES:
            raise ConfigError(f"fp8 recipe {self.recipe!r} is not one of {RECIPES}; use --fp8-recipe delayed or "
                              "tensorwise")
        if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
            raise ConfigError(f"--fp8-amax-compute-algo {self.amax_compute_algo!r} is not one of "
                              f"{AMAX_COMPUTE_ALGOS}")
        if self.amax_history_len < 1:
            raise ConfigError(f"--fp8-amax-history-len must be >= 1, got {self.amax_history_len}")

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3

    @property
    def delayed(self) -> bool:
        return self.recipe == "delayed"


def amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as an fp32 scalar tensor, in one pass over ``t`` in its own dtype (a max is exact; no |t| or fp32
    temporary)."""
    return torch.linalg.vector_norm(t, float("inf")).float()


def reduce_amax(amaxes: torch.Tensor, split_over_tp: bool = True) -> torch.Tensor:
    """The element-wise MAX of ``amaxes`` over the ranks that hold parts of these tensors: tp x cp (a tensor
    split over tp, or replicated over it: the MAX of equal values is that value), or cp alone when
    ``split_over_tp`` is False (a tensor replicated over tp: no tp collective)."""
    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    if cp > 1:
        group = ps.get_tensor_and_context_parallel_group() if split_over_tp and tp > 1 else \
            ps.get_context_parallel_group()
    elif tp > 1 and split_over_tp:
        group = ps.get_tensor_model_parallel_group()
    else:
        return amaxes
    if torch.compiler.is_compiling():
        return funcol.all_reduce(amaxes, "max", group)
    dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
    return amaxes


def amax_to_scale(amax_: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """fp32 scale mapping ``amax`` onto the format's largest value (``2**-margin`` below it)."""
    scale = torch.finfo(dtype).max / amax_.float().clamp(min=_EPS)
    return scale if margin == 0 else scale * (2.0 ** -margin)


def _cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast of ``t * scale`` (product in fp32): e4m3fn has no inf, an overflow would be NaN."""
    fmax = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


_compiled_cast = None  # CUDA: one fused kernel (eager is four passes with an fp32 temporary); None: not tried yet


def quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in fp8 (contiguous, same shape). On CUDA through a compiled kernel, which rounds as eager does."""
    global _compiled_cast
    t = t.contiguous()
    if t.is_cuda and not torch.compiler.is_compiling() and _compiled_cast is not False:
        try:
            if _compiled_cast is None:
                _compiled_cast = torch.compile(_cast, dynamic=True)
            return _compiled_cast(t.view(-1), scale, dtype).view(t.shape)  # 1-D: one graph per dtype pair
        except Exception as err:  # noqa: BLE001 - no triton/compiler here: stay correct, only slower
            warnings.warn(f"fp8: compiled cast unavailable ({type(err).__name__}: {err}); casting in eager")
            _compiled_cast = False
    return _cast(t, scale, dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 values ``q`` stands for (tests and references)."""
    return q.float() * scale.reciprocal()


def _pad_inner(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad ``dim`` up to a multiple of ALIGN (an fp8 zero is the zero byte)."""
    pad = -t.shape[dim] % ALIGN
    if not pad:
        return t
    widths = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, pad]
    return F.pad(t.view(torch.uint8), widths).view(t.dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False, cpu_emulation: bool = True) -> torch.Tensor:
    """``(a / a_scale) @ (b / b_scale)`` for fp8 ``a`` [M, K] and ``b`` [K, N], in ``out_dtype``.

    Lays the operands out as cuBLASLt wants them (``a`` row-major, ``b`` column-major) and zero-pads K to a
    multiple of 16 (the token dim of a weight gradient); M is free. ``fast_accum``: Hopper's faster, less exact
    accumulation, for the forward GEMM only (TE's and torchao's choice). ``cpu_emulation=False``: torch's own CPU
    kernel (tests compare the two)."""
    a = a if a.is_contiguous() else a.contiguous()
    b = b if b.t().is_contiguous() else b.t().contiguous().t()
    if a.shape[1] % ALIGN:
        a, b = _pad_inner(a, 1), _pad_inner(b.t(), 1).t()
    if a.is_cuda or not cpu_emulation:
        return torch._scaled_mm(a, b, a_scale.reciprocal(), b_scale.reciprocal(), out_dtype=out_dtype,
                                use_fast_accum=fast_accum and a.is_cuda)
    # CPU: torch's fp8 GEMM is a scalar loop there (20 ms for 64x64x128). The same math through an fp32 GEMM: the
    # products of fp8 values are exact in fp32, the sum is fp32, the dequantisation scales apply to the result.
    # An fp64 output sums in fp64, where sums of fp8 products are (nearly always) exact whatever their order: the
    # layout-equivalence tests run so, and no summation order can flip a later fp8 rounding.
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    return (torch.mm(a.to(acc), b.to(acc)) * (a_scale.reciprocal() * b_scale.reciprocal()).to(acc)).to(out_dtype)


def check_linear_shape(weight: torch.Tensor, name: str = "linear") -> None:
    """Refuse a weight shard whose dims fp8 GEMMs cannot take (a multiple of 16 on each side)."""
    out_f, in_f = weight.shape
    if out_f % ALIGN or in_f % ALIGN:
        raise ConfigError(f"fp8: {name} has a [{out_f}, {in_f}] weight (per tensor-parallel rank); fp8 GEMMs need "
                          f"both dims multiples of {ALIGN}: change the hidden/FFN/head sizes or drop --fp8-format")


def enable_fp8(module: torch.nn.Module, recipe: Optional[Fp8Recipe]) -> int:
    """Run every Column/RowParallelLinear inside ``module`` in fp8 (``recipe``) or, with None, in the compute
    dtype again; returns how many. Pass the decoder layers only: the embedding and the output layer stay 16-bit,
    as in Transformer Engine and torchtitan. A delayed recipe gives each linear a fresh ``fp8_delayed.Fp8Meta``
    (on the module and on its weight, which is what the GEMM functions see)."""
    from megallama.mpu.fp8_delayed import Fp8Meta
    from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear
    count = 0
    for name, m in module.named_modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            if recipe is not None:
                check_linear_shape(m.weight, name)
            m.fp8 = recipe
            m.fp8_meta = m.weight.fp8_meta = Fp8Meta(recipe, m.weight.device) if recipe and recipe.delayed else None
            count += 1
    return count
