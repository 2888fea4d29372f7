"""Megatron's ``--dataloader-type cyclic``: every pass over the training data in a fresh order. The Python API
picks it for a ``DataLoader(shuffle=True)``.

The order is a function of the sample index alone (sample ``i`` is ``permutation(seed, i // n)[i % n]`` of pass
``i // n``), the same on every rank, so the data-parallel split and a resume at any consumed-samples count (or with
a longer run) read exactly what an uninterrupted run reads, as with the default ``single`` order.
"""
from __future__ import annotations

import math

import torch


class EpochShuffledDataset(torch.utils.data.Dataset):
    """Blocks of one pass each (a corpus epoch where the dataset knows it: ``samples_per_epoch``, else its length),
    each in its own order; block sizes do not depend on the run's length, so a resume with more iterations reads on
    in the same order instead of reshuffling what was already read."""

    def __init__(self, dataset, seed: int, num_samples: int):
        self.dataset, self.seed = dataset, seed
        self.block = int(getattr(dataset, "samples_per_epoch", 0) or len(dataset))
        self.beyond = hasattr(dataset, "samples_per_epoch")  # ds[i] is defined past one epoch (later epochs)
        self.epochs = max(1, math.ceil(num_samples / self.block))  # as many passes as the run reads
        self._epoch, self._perm = None, None

    def __len__(self) -> int:
        return self.block * self.epochs

    def __getitem__(self, i: int):
        epoch, j = divmod(int(i), self.block)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.block, generator=g)
        k = int(self._perm[j])
        return self.dataset[epoch * self.block + k if self.beyond else k]

    def __getattr__(self, name):  # dataset hooks (wrap_iterator) pass through
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def apply_dataloader_type(args, train):
    """The training set in --dataloader-type's order: "single" as built, "cyclic" shuffled each pass."""
    if getattr(args, "dataloader_type", "single") != "cyclic" or train is None:
        return train
    return EpochShuffledDataset(train, args.seed, args.train_iters * args.global_batch_size)
