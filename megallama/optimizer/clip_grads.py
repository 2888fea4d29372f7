"""The global gradient norm over dp shards and model-parallel ranks, and clipping by it.

Each gradient element must be counted exactly once in the world: a tp-sharded parameter counts on every tp rank
(each holds a different slice), a parameter replicated over tp only on tp rank 0, every pipeline stage contributes
its own layers, and the tied ``output_weight`` copy on the last stage (``shared_embedding``) is skipped because the
first stage's embedding already counts it. Sharded (ZeRO >= 1) gradients are summed over dp; replicated
(stage 0) ones count on dp rank 0 only, so one all-reduce over dp and one over tp x pp give the total.

Squares are summed in fp64 over tensors and ranks, and within a tensor in fp64 on CUDA (``_foreach_norm(dtype=
float64)`` accumulates without a copy) or over fp32 chunk norms on CPU (an fp64 copy cost 14x the time): torch's
fp32 CPU norm is off by ~1e-5 relative at 1M elements (1e-3 at 10M), and a finite norm above ~1.8e19, whose fp32
square overflows, is not mistaken for a non-finite one. ``global_norm`` returns a float: the one host sync of the
optimizer step, which needs it to skip non-finite steps, update the loss scale and pick the clip coefficient.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from megallama.mpu import parallel_state as ps


def counts_in_norm(param) -> bool:
    if getattr(param, "shared_embedding", False):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or ps.get_tensor_model_parallel_rank() == 0


_CPU_CHUNK = 2048


def _cpu_sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """fp32 norms of 2048-element chunks, squared and summed in fp64: ~1e-9 relative at 50M elements for a
    twentieth of the time of an fp64 copy; a tensor whose fp32 squares overflow is redone in fp64."""
    flat = g.detach().reshape(-1)
    m = flat.numel() // _CPU_CHUNK * _CPU_CHUNK
    parts = [torch.linalg.vector_norm(flat[:m].view(-1, _CPU_CHUNK), dim=1, dtype=torch.float32).double()] if m else []
    if m < flat.numel():
        parts.append(flat[m:].double().norm().reshape(1))
    sq = torch.cat(parts).square().sum()
    if not torch.isfinite(sq):  # overflow of an fp32 square (a norm > ~1.8e19) or a real inf/nan: exact pass
        sq = flat.double().square().sum()
    return sq


def sum_of_squares(grads: Sequence[torch.Tensor], device) -> torch.Tensor:
    """fp64 sum of squares of ``grads`` as a 1-element tensor on ``device``."""
    if not grads:
        return torch.zeros(1, dtype=torch.float64, device=device)
    grads = list(grads)
    if grads[0].is_cuda:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)  # fp64 accumulation without a copy
        return torch.stack(norms).square().sum().reshape(1)
    return torch.stack([_cpu_sum_of_squares(g) for g in grads]).sum().reshape(1)


def global_sum(local: torch.Tensor, dp_group) -> float:
    """The sum of ``local`` (a 1-element fp64 tensor) over dp and over the model-parallel (tp x pp) group."""
    total = local.clone()
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    mp = ps.get_model_parallel_group()
    if mp is not None and dist.get_world_size(mp) > 1:
        dist.all_reduce(total, group=mp)
    return float(total.item())


def global_norm(local_sq: torch.Tensor, dp_group) -> float:
    """sqrt of the sum of ``local_sq`` over dp and over the model-parallel (tp x pp) group."""
    return math.sqrt(global_sum(local_sq, dp_group))


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s coefficient: max_norm / (norm + 1e-6), applied only when below 1."""
    if not max_norm or max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))
