"""The flat layout behind DDP and ZeRO: parameters in contiguous buckets, each bucket split evenly over dp ranks.

Parameters are placed in backward order (reverse of registration) so buckets fill up, and can be reduced, in the
order backward produces gradients. Each bucket is padded to a multiple of ``dp * ALIGN`` elements: every rank's
shard of every bucket then has the same size and starts aligned, and one ``reduce_scatter``/``all_gather`` moves a
bucket. Rank ``r`` owns ``[offset + r*s, offset + (r+1)*s)`` of each bucket (``s`` = bucket numel / dp), as in
Megatron's distributed optimizer; a rank's *shard* is the concatenation of its pieces of all buckets, so a global
buffer index ``g`` in bucket ``b`` maps to shard index ``g - b.offset - r*s + b.offset // dp``. A shard boundary
may cut through a parameter: the optimizer works on (parameter, element range) pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

ALIGN = 64  # elements: shard starts stay 128-byte aligned in bf16 for NCCL

# torch 2.13 renamed the tensor collectives (the old names warn); 2.11 on the GPU machine has only the old ones.
all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class Bucket:
    index: int
    params: List[torch.nn.Parameter]
    offset: int  # first element in the flat buffer
    numel: int  # padded to a multiple of dp * ALIGN (dp > 1)
    numel_unpadded: int
    dp: int
    # run-time bookkeeping (owned by DistributedDataParallel)
    num_ready: int = 0
    launched: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def shard_size(self) -> int:
        return self.numel // self.dp

    @property
    def shard_offset(self) -> int:
        """Where this bucket's piece starts in a rank's shard."""
        return self.offset // self.dp

    def own_range(self, rank: int) -> Tuple[int, int]:
        """Global buffer range owned by dp rank ``rank``."""
        s = self.shard_size
        return self.offset + rank * s, self.offset + (rank + 1) * s


@dataclass
class Piece:
    """The part of one parameter that lies in this rank's shard (the whole parameter when not sharded)."""
    param: torch.nn.Parameter
    param_start: int  # element range within the flattened parameter
    param_end: int
    buf_start: int  # global flat-buffer index of param_start
    shard_start: int  # index of param_start in this rank's shard (== buf_start when not sharded)

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


class BufferLayout:
    """Where every parameter lives in the flat buffer, and which pieces each dp rank owns."""

    def __init__(self, bucket_params: Sequence[Sequence[torch.nn.Parameter]], dp: int):
        self.dp = dp
        self.buckets: List[Bucket] = []
        self.index: Dict[torch.nn.Parameter, Tuple[int, int, int]] = {}  # param -> (start, end, bucket index)
        offset = 0
        for params in bucket_params:
            params = list(params)
            if not params:
                continue
            start = offset
            for p in params:
                if p in self.index:
                    raise ValueError("a parameter was assigned to two buckets")
                self.index[p] = (offset, offset + p.numel(), len(self.buckets))
                offset += p.numel()
            unpadded = offset - start
            numel = _round_up(unpadded, dp * ALIGN) if dp > 1 else unpadded
            self.buckets.append(Bucket(len(self.buckets), params, start, numel, unpadded, dp))
            offset = start + numel
        self.numel = offset
        self.numel_unpadded = sum(b.numel_unpadded for b in self.buckets)
        self.shard_numel = offset // dp

    def bucket_of(self, p: torch.nn.Parameter) -> Bucket:
        return self.buckets[self.index[p][2]]

    def pieces(self, rank: int, sharded: bool) -> List[Piece]:
        """This rank's pieces in buffer order; every parameter whole when ``sharded`` is False."""
        out = []
        for b in self.buckets:
            lo, hi = b.own_range(rank) if sharded else (b.offset, b.offset + b.numel)
            for p in b.params:
                s, e, _ = self.index[p]
                a, z = max(s, lo), min(e, hi)
                if a < z:
                    shard = a - lo + b.shard_offset if sharded else a
                    out.append(Piece(p, a - s, z - s, a, shard))
        return out


def bucketize(params: Sequence[torch.nn.Parameter], bucket_size: int,
              own_bucket=lambda p: False) -> List[List[torch.nn.Parameter]]:
    """Greedy split of ``params`` (already in backward order) into buckets of at least ``bucket_size`` elements;
    parameters for which ``own_bucket`` is true get a bucket of their own (so their position in the buffer is the
    same on every rank that holds them, e.g. the tied embedding on the first and last pipeline stage)."""
    buckets, cur, n = [], [], 0
    for p in params:
        if own_bucket(p):
            buckets.append([p])
            continue
        cur.append(p)
        n += p.numel()
        if bucket_size and n >= bucket_size:
            buckets.append(cur)
            cur, n = [], 0
    if cur:
        buckets.append(cur)
    return buckets
