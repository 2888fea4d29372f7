"""The flat layout behind DDP and ZeRO: parameters in contiguous buckets, each bucket split evenly over dp ranks.

Parameters are placed in backward order (reverse of registration) so buckets fill up, and can be reduced, in the
order backward produces gradients. Each bucket is padded to a multiple of ``dp * ALIGN`` elements: every rank's
shard of every bucket then has the same size and starts aligned, and one ``reduce_scatter``/``all_gather`` moves a
bucket. Rank ``r`` owns ``[offset + r*s, offset + (r+1)*s)`` of each bucket (``s`` = bucket numel / dp), as in
Megatron's distributed optimizer; a rank's *shard* is the concatenation of its pieces of all buckets, so a global
buffer index ``g`` in bucket ``b`` maps to shard index ``g - b.offset - r*s + b.shard_offset``. A shard boundary
may cut through a parameter: the optimizer works on (parameter, element range) pieces. Each bucket carries the
``Comm`` it is reduced over (MoE expert params: the expert-data-parallel group, in buckets of their own).
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
class Comm:
    """The group a bucket is reduced over. Dense params: the data-parallel group. MoE expert params (ep > 1): the
    expert-data-parallel group, still averaged over the full dp size (the all-to-all already summed over ep)."""
    group: object  # None when size == 1
    size: int
    rank: int
    average_over: int  # gradients are divided by this (the full dp size)
    nccl: bool = False
    expert: bool = False

    @property
    def avg_in_collective(self) -> bool:
        """NCCL averages inside the collective when the divisor is the group size; otherwise pre-scale."""
        return self.nccl and self.average_over == self.size

    @staticmethod
    def of(group, average_over: int = None, expert: bool = False) -> "Comm":
        size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        if size == 1:
            return Comm(None, 1, 0, average_over or 1, False, expert)
        return Comm(group, size, dist.get_rank(group), average_over or size, dist.get_backend(group) == "nccl",
                    expert)


@dataclass
class Bucket:
    index: int
    params: List[torch.nn.Parameter]
    offset: int  # first element in the flat buffer
    numel: int  # padded to a multiple of comm.size * ALIGN when sharded
    numel_unpadded: int
    comm: Comm
    shard_offset: int  # where this bucket's piece starts in a rank's shard
    # run-time bookkeeping (owned by DistributedDataParallel)
    num_ready: int = 0
    launched: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def shard_size(self) -> int:
        return self.numel // self.comm.size

    def own_range(self) -> Tuple[int, int]:
        """Global buffer range owned by this rank."""
        s = self.shard_size
        return self.offset + self.comm.rank * s, self.offset + (self.comm.rank + 1) * s


@dataclass
class Piece:
    """The part of one parameter that lies in this rank's shard (the whole parameter when not sharded)."""
    param: torch.nn.Parameter
    param_start: int  # element range within the flattened parameter
    param_end: int
    buf_start: int  # global flat-buffer index of param_start
    shard_start: int  # index of param_start in this rank's shard (== buf_start when not sharded)
    comm: Comm = None

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


class BufferLayout:
    """Where every parameter lives in the flat buffer, and which pieces this rank owns."""

    def __init__(self, bucket_params: Sequence[Tuple[Sequence[torch.nn.Parameter], Comm]], sharded: bool):
        self.sharded = sharded
        self.buckets: List[Bucket] = []
        self.index: Dict[torch.nn.Parameter, Tuple[int, int, int]] = {}  # param -> (start, end, bucket index)
        offset = shard_offset = 0
        for params, comm in bucket_params:
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
            numel = _round_up(unpadded, comm.size * ALIGN) if sharded and comm.size > 1 else unpadded
            b = Bucket(len(self.buckets), params, start, numel, unpadded, comm, shard_offset if sharded else start)
            self.buckets.append(b)
            offset = start + numel
            shard_offset += b.shard_size if sharded else numel
        self.numel = offset
        self.numel_unpadded = sum(b.numel_unpadded for b in self.buckets)
        self.shard_numel = shard_offset

    def bucket_of(self, p: torch.nn.Parameter) -> Bucket:
        return self.buckets[self.index[p][2]]

    def pieces(self) -> List[Piece]:
        """This rank's pieces in buffer order; every parameter whole when the layout is not sharded."""
        out = []
        for b in self.buckets:
            lo, hi = b.own_range() if self.sharded else (b.offset, b.offset + b.numel)
            for p in b.params:
                s, e, _ = self.index[p]
                a, z = max(s, lo), min(e, hi)
                if a < z:
                    shard = a - lo + b.shard_offset if self.sharded else a
                    out.append(Piece(p, a - s, z - s, a, shard, b.comm))
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


def needs_own_bucket(module: torch.nn.Module, p: torch.nn.Parameter) -> bool:
    """The tied embedding/output pair that lives on two pipeline stages; its grads are summed over the embedding
    group, which needs the same in-bucket layout on both stages: it gets a bucket of its own."""
    if getattr(p, "shared_embedding", False) or getattr(p, "shared", False):
        return True
    if getattr(module, "share_embeddings", False) and getattr(module, "pre_process", True) \
            and not getattr(module, "post_process", True):
        emb = getattr(getattr(module, "model", None), "embed_tokens", None)
        return emb is not None and p is emb.weight
    return False
