"""Megatron's pretraining sampler: a resumable, data-parallel split of one global sample order.

Sample indices run 0, 1, 2, ... in order. Every micro-step takes the next ``micro_batch_size * dp`` of them and data-
parallel rank r gets the r-th slice of ``micro_batch_size``. The position is just ``consumed_samples`` (= iteration x
global batch size), so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen
next, and the dp ranks always read disjoint samples whose union is the global batch. Past the end of the dataset the
order wraps around (a dataset sized for the run never gets there).
"""
from __future__ import annotations

import torch

from megallama.errors import ConfigError


class MegatronPretrainingSampler:
    """Infinite iterable of index lists (one micro-batch for this dp rank each)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int):
        if total_samples <= 0:
            raise ConfigError("the dataset is empty: no samples to train on; give more data or a shorter "
                              "--seq-length")
        if micro_batch_size <= 0 or data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"bad sampler shape: micro batch {micro_batch_size}, dp rank {data_parallel_rank} of "
                             f"{data_parallel_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples {consumed_samples} must be >= 0")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __iter__(self):
        step = self.micro_batch_size * self.data_parallel_size
        start = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        while True:
            yield [(start + j) % self.total_samples for j in range(self.micro_batch_size)]
            start += step


def collate(samples: list[dict]) -> dict:
    """A list of {name: tensor} samples -> {name: stacked tensor}."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def build_data_iterator(dataset, micro_batch_size: int, consumed_samples: int, data_parallel_rank: int = 0,
                        data_parallel_size: int = 1, num_workers: int = 0):
    """Infinite iterator of collated micro-batches ({"input_ids": [b, s], "labels": [b, s], "loss_mask": [b, s]}) for
    this data-parallel rank, starting after ``consumed_samples`` global samples."""
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                         data_parallel_size)
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=collate, persistent_workers=True)
        return iter(loader)
    return (collate([dataset[i] for i in idx]) for idx in sampler)
