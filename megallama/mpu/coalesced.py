"""One all-reduce for many gradients: the tied embedding pair, sequence-parallel norms, DDP pieces summed over
another group. Fewer, larger collectives than one per tensor; the sums are the same element by element."""
from typing import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@torch.no_grad()
def all_reduce_coalesced(tensors: Sequence[torch.Tensor], group) -> None:
    """Sum ``tensors`` (one dtype and device) over ``group`` in place through one flat buffer."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)
