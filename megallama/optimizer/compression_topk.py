"""Top-k sparsification with error feedback as a DDP comm hook: ``--gradient-compression topk``.

Each bucket's k = ratio * n largest entries of gradient + error (the csrc top-k kernel), the same share of each of
its N owner chunks, travel as (fp32 value, int32 index) pairs by whichever of two transports sends fewer bytes.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Tuple

import torch

from megallama.ops import compression as kernels
from megallama.optimizer.compression import GradientCompressor, collective_bytes
from megallama.optimizer.param_and_grad_buffer import ALIGN


@functools.lru_cache(maxsize=None)
def topk_layout(numel_unpadded: int, numel: int, k: int, world: int) -> Tuple[int, int, Tuple[int, ...]]:
    """(c, kc, counts): the bucket is cut into ``world`` owner chunks of ``c`` elements, the ZeRO-1 shard size (so
    the chunks are the shards at stage 1, and the same at stage 0, where the last ones may be short or empty); top-k
    keeps the same share of each, its ``kc`` = k c / n largest entries (``counts[j]`` of chunk j when shorter).
    Fixed per bucket, so cached here rather than in the compressor's checkpointed state."""
    c = -(-numel_unpadded // (world * ALIGN)) * ALIGN
    kc = min(c, -(-k * c // numel_unpadded))
    return c, kc, tuple(min(kc, max(0, min(numel, (j + 1) * c) - j * c)) for j in range(world))


def topk_transport_bytes(numel_unpadded: int, numel: int, k: int, world: int, zero_stage: int) -> Dict[str, float]:
    """Bytes one rank sends per step by each top-k transport (see TopKCompressor)."""
    c, kc, counts = topk_layout(numel_unpadded, numel, k, world)
    scatter = collective_bytes("all_to_all", 8 * world * kc, world)
    if zero_stage == 0:
        scatter += collective_bytes("all_gather", 4 * c, world)
    return {"all_gather": collective_bytes("all_gather", 8 * sum(counts), world), "reduce_scatter": scatter}


class TopKCompressor(GradientCompressor):
    """Top-k with error feedback: the largest entries of gradient + error, the same share k / n of each of the
    bucket's world owner chunks (``topk_layout``), sent as (fp32 value, int32 index) pairs by whichever transport
    sends fewer bytes for the bucket (``topk_transport_bytes``):

    * all-gather: every rank's pairs go to every rank, which sums all of them, (N-1) x 8k bytes. Cheapest for
      small k on few ranks, but it grows with N.
    * reduce-scatter: each chunk's pairs go to its owner only (all-to-all, (N-1)/N x 8k), which sums them into its
      chunk of the average; at stage 0 the owners then all-gather their dense chunks ((N-1)/N x 4n). At ZeRO-1 the
      chunks are the shards the optimizer reads, so that second phase is not needed: like DDP's own
      reduce-scatter, only this rank's shard holds the average afterwards.

    Both transports give the same average (the same pairs, summed in rank order)."""

    def init_state(self, bucket, data):
        k = max(1, math.ceil(self.config.topk_ratio * bucket.numel_unpadded))
        return {"k": min(k, bucket.numel_unpadded), "error": torch.zeros(bucket.numel, device=data.device)}

    def transport(self, bucket, k: int) -> str:
        costs = topk_transport_bytes(bucket.numel_unpadded, bucket.numel, k, self.world, self.ddp.zero_stage)
        return "reduce_scatter" if costs["reduce_scatter"] < costs["all_gather"] else "all_gather"

    def compress(self, bucket, data, st):
        c, kc, counts = topk_layout(bucket.numel_unpadded, bucket.numel, st["k"], self.world)
        msg = torch.zeros((self.world, 2, kc), dtype=torch.int32, device=data.device)  # chunk j's (value bits, index)
        for j, n in enumerate(counts):  # short chunks padded with (0.0, 0), which adds nothing
            if n:
                values, indices = kernels.topk_pack(data[j * c:j * c + c], st["error"][j * c:j * c + c], n)
                msg[j, 0, :n], msg[j, 1, :n] = values.view(torch.int32), indices
        if self.transport(bucket, st["k"]) == "all_gather":
            pairs = torch.cat([torch.stack([msg[j, 0, :n], msg[j, 1, :n] + j * c]) for j, n in enumerate(counts) if n],
                              dim=1)
            got = self.all_gather(pairs)  # [world, 2, sum(counts)]
            data.copy_(kernels.topk_unpack(got[:, 0].contiguous().view(torch.float32), got[:, 1].contiguous(),
                                           bucket.numel, 1.0 / self.world))
            return
        got = self.all_to_all(msg.view(self.world, -1)).view(self.world, 2, kc)  # row i: rank i's pairs for my chunk
        mine = kernels.topk_unpack(got[:, 0].contiguous().view(torch.float32), got[:, 1].contiguous(), c,
                                   1.0 / self.world)
        if self.ddp.zero_stage == 0:
            data.copy_(self.all_gather(mine).view(-1)[:bucket.numel])
        else:  # ZeRO-1: this rank's shard of the average, where DDP's reduce-scatter leaves it
            assert c == bucket.shard_size, (c, bucket.shard_size)
            lo = bucket.comm.rank * c
            data[lo:lo + c].copy_(mine)
