"""Gradient sync for parameters that are replicated over tp but see only a sequence shard.

Under sequence parallelism the norms (and row-parallel biases) run on [b, s/tp, h] shards, so each tp rank's
gradient of their weights is a partial sum over its tokens; the full gradient is the sum over tp. Such parameters
carry ``param.sequence_parallel = True``. The training loop calls ``allreduce_sequence_parallel_gradients`` once
after backward (before the data-parallel reduction and the optimizer step), as Megatron's
``_allreduce_layernorm_grads`` does: one coalesced all-reduce for all of them.
"""
import torch

from megallama.mpu import parallel_state as ps
from megallama.mpu.coalesced import all_reduce_coalesced


def sequence_parallel_params(module: torch.nn.Module):
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]


def _grad_of(p):
    """Megatron-style wrappers accumulate into ``param.main_grad``; plain autograd into ``param.grad``."""
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


@torch.no_grad()
def allreduce_sequence_parallel_gradients(module) -> int:
    """All-reduce over tp the grads of params marked ``sequence_parallel``; returns how many were reduced.

    ``module`` may be a list of model chunks. A no-op for tp = 1."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    modules = module if isinstance(module, (list, tuple)) else [module]
    grads = [g for m in modules for g in (_grad_of(p) for p in sequence_parallel_params(m)) if g is not None]
    if not grads:
        return 0
    group = ps.get_tensor_model_parallel_group()
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for bucket in by_dtype.values():
        all_reduce_coalesced(bucket, group)
    return len(grads)
