"""Megatron's ``--dataloader-type cyclic``: every pass over the training data in a fresh order. The Python API
picks it for a ``DataLoader(shuffle=True)``.

The order is a function of the sample index alone (sample ``i`` is ``permutation(seed, i // n)[i % n]``), the same
on every rank, so the data-parallel split and a resume at any consumed-samples count read exactly what an
uninterrupted run reads, as with the default ``single`` order.
"""
from __future__ import annotations

import math

import torch


class EpochShuffledDataset(torch.utils.data.Dataset):
    def __init__(self, dataset, seed: int, num_samples: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)
        self.epochs = max(1, math.ceil(num_samples / self.n))  # as many passes as the run reads
        self._epoch, self._perm = None, None

    def __len__(self) -> int:
        return self.n * self.epochs

    def __getitem__(self, i: int):
        epoch, j = divmod(int(i), self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self.dataset[int(self._perm[j])]

    def __getattr__(self, name):  # dataset hooks (wrap_iterator) pass through
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def apply_dataloader_type(args, train):
    """The training set in --dataloader-type's order: "single" as built, "cyclic" shuffled each pass."""
    if getattr(args, "dataloader_type", "single") != "cyclic" or train is None:
        return train
    return EpochShuffledDataset(train, args.seed, args.train_iters * args.global_batch_size)
