"""User data for the Python API: whatever ``launch_training(train_dataloader, val_dataloader)`` is given, as the
map-style datasets the training loop samples from (``{"input_ids", "labels", "loss_mask"}`` per sample).

Accepted: a ``torch.utils.data.DataLoader`` (its map-style ``.dataset``, else its batches; ``shuffle=True`` trains
each pass in a fresh order, Megatron's ``--dataloader-type cyclic``; its batch size is kept as ``batch_size``, the
run's micro-batch per rank, PyTorch's meaning of it: see ``api_batch``), any dataset with
``__len__``/``__getitem__``, or an iterable; items are token-id tensors/lists of ``seq`` or ``seq + 1`` tokens,
``[batch, ...]`` tensors, or dicts with ``input_ids`` (and optionally ``labels``, ``loss_mask``/``attention_mask``).
``seq + 1`` tokens are shifted into inputs and labels; ``seq`` tokens without labels predict the next token, the
last position masked. Given labels are the next token at each position (Megatron's convention, not HF's unshifted
copy of the inputs, which is refused); a label of -100 (HF's ignore index) masks its position.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from megallama.errors import ConfigError


def _samples_of(item) -> List[Any]:
    """Split a batched item ([b, s] tensor, dict of [b, s] tensors) into per-sample items."""
    if isinstance(item, dict):
        ids = torch.as_tensor(item["input_ids"])
        if ids.dim() == 2:
            return [{k: torch.as_tensor(v)[i] for k, v in item.items() if torch.is_tensor(v) or isinstance(v, list)}
                    for i in range(ids.shape[0])]
        return [item]
    if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]) and item[0].dim() == 2:
        return [tuple(t[i] for t in item) for i in range(item[0].shape[0])]
    t = item if not isinstance(item, (list, tuple)) or not item or not isinstance(item[0], (list, tuple)) else \
        torch.as_tensor(item)
    if torch.is_tensor(t) and t.dim() == 2:
        return [t[i] for i in range(t.shape[0])]
    return [item]


def _loader_batch_size(loader) -> Optional[int]:
    """Sequences per batch of a batching DataLoader (``batch_size``, or its ``BatchSampler``'s); None when it does
    not batch (``batch_size=None``: its items are what the dataset yields)."""
    if loader.batch_size is not None:
        return int(loader.batch_size)
    bs = loader.batch_sampler
    return int(bs.batch_size) if isinstance(bs, torch.utils.data.BatchSampler) else None


def _yielded_batch(sizes: List[int], name: str) -> Tuple[Optional[int], Optional[str]]:
    """(batch size, note) of a DataLoader without automatic batching, from the sizes of the batches it yielded: one
    size (a smaller last batch allowed) is its batch; single sequences leave the batch to megallama; mixed sizes
    cannot be one micro-batch, said in the note."""
    full = sizes[:-1] if len(sizes) > 1 and sizes[-1] < sizes[0] else sizes
    if not full or max(full) == 1:
        return None, None
    if len(set(full)) == 1:
        return full[0], None
    return None, (f"note: the {name} DataLoader's batches hold {min(full)} to {max(full)} sequences; megallama "
                  "trains fixed micro-batches of its samples instead (set TrainingConfig.micro_batch_size)")


class UserDataset(torch.utils.data.Dataset):
    """Samples normalised to the loop's layout for ``seq_length`` and ``vocab_size``."""

    def __init__(self, source, seq_length: int, vocab_size: int, name: str = "train"):
        self.seq_length, self.vocab_size, self.name = seq_length, vocab_size, name
        self.shuffle = False  # a DataLoader(shuffle=True): trained with --dataloader-type cyclic
        # sequences per batch its DataLoader yields (None: no DataLoader, or one yielding single sequences)
        self.batch_size: Optional[int] = None
        self.batch_note: Optional[str] = None  # a DataLoader whose batches differ in size: said, not followed
        loader = source if isinstance(source, torch.utils.data.DataLoader) else None
        self.from_loader = loader is not None
        if loader is not None:
            self.batch_size = _loader_batch_size(loader)
            source = self._sampled(loader, name)
        if isinstance(source, dict):  # one batch: {"input_ids": [b, s], ...}
            self.items = _samples_of(source)
        elif isinstance(source, (list, tuple)):  # held in memory already: split its batched items
            self.items = [s for item in source for s in _samples_of(item)]
        elif hasattr(source, "__getitem__") and hasattr(source, "__len__") and not torch.is_tensor(source):
            self.items = source  # a dataset: read lazily, one sample per item
        elif torch.is_tensor(source):
            self.items = _samples_of(source)
        else:
            split = [_samples_of(item) for item in source]
            self.items = [s for item in split for s in item]
            if source is loader and self.batch_size is None:  # no automatic batching: its items are the batches
                self.batch_size, self.batch_note = _yielded_batch([len(b) for b in split], name)
        if len(self.items) == 0:
            raise ConfigError(f"the {name} data holds no samples; give at least one sequence of "
                              f"{seq_length + 1} tokens")

    def _sampled(self, loader, name: str):
        """The samples a DataLoader's sampler reads: in order, shuffled each pass (RandomSampler,
        DistributedSampler(shuffle=True)), or a SubsetRandomSampler's subset (its train/validation split). megallama
        splits them over data-parallel ranks itself; a sampler that would read other samples is refused."""
        data = torch.utils.data
        if type(loader.batch_sampler) not in (data.BatchSampler, type(None)):
            raise ConfigError(f"the {name} DataLoader's {type(loader.batch_sampler).__name__} chooses its own "
                              "batches, which megallama would not follow; pass the dataset or a plain DataLoader")
        ds = loader.dataset
        if isinstance(ds, data.IterableDataset) or not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            return loader  # its batches, as they come (its sampler is only a placeholder)
        # DataLoader(batch_sampler=BatchSampler(RandomSampler(ds), ...)): the order is its sampler's
        sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
        if isinstance(sampler, data.SubsetRandomSampler):
            self.shuffle = True
            return data.Subset(ds, list(sampler.indices))
        if isinstance(sampler, data.DistributedSampler):
            self.shuffle = bool(sampler.shuffle)
        elif isinstance(sampler, data.RandomSampler):
            self.shuffle = True
        elif not isinstance(sampler, data.SequentialSampler):
            raise ConfigError(f"the {name} DataLoader's {type(sampler).__name__} picks samples megallama would not "
                              "read the same way; pass the dataset (or a Subset of it) with shuffle=True/False")
        if loader.batch_sampler is None and len(ds) and len(_samples_of(ds[0])) > 1:
            return loader  # batch_size=None over a dataset of batches: its batches, in its sampler's order
        return ds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = self.items[i % len(self.items)]
        labels = mask = None
        if isinstance(item, dict):
            ids = torch.as_tensor(item["input_ids"])
            labels = item.get("labels")
            mask = item.get("loss_mask", item.get("attention_mask"))
        elif isinstance(item, tuple):
            ids, labels = (torch.as_tensor(item[0]), torch.as_tensor(item[1]) if len(item) > 1 else None)
        else:
            ids = torch.as_tensor(item)
        if ids.dim() > 1 and ids.shape[0] != 1:
            raise ConfigError(f"{self.name} item {i} holds a batch of {ids.shape[0]} sequences; a dataset gives one "
                              "per item (a DataLoader, list or iterable of batches is split into samples)")
        ids = ids.long().reshape(-1)
        mask = None if mask is None else torch.as_tensor(mask).float().reshape(-1)
        s = self.seq_length
        if labels is None:  # the label of position j is token j + 1: its mask entry (HF's shift of the labels)
            if ids.numel() >= s + 1:
                ids, labels, mask = ids[:s], ids[1:s + 1], None if mask is None else mask[1:s + 1]
            else:
                labels = torch.cat([ids[1:], ids.new_zeros(1)])
                mask = torch.ones(ids.numel()) if mask is None else mask
                mask = torch.cat([mask[1:], mask.new_zeros(1)])  # the last position has no next token
        labels = torch.as_tensor(labels).long().reshape(-1)
        mask = torch.ones(ids.numel()) if mask is None else torch.as_tensor(mask).float().reshape(-1)
        if ids.numel() != s or labels.numel() != s or mask.numel() != s:
            raise ConfigError(f"{self.name} sample {i} has {ids.numel()} tokens but the sequence length is {s}; give "
                              f"{s} (with labels) or {s + 1} tokens per sample, or set sequence_length")
        ignore = labels < 0  # HF's ignore index (-100): no loss there, and not counted in the mean either
        if bool(ignore.any()):
            mask, labels = mask * ~ignore, labels.masked_fill(ignore, 0)
        top = int(max(ids.max(), labels.max()))
        if top >= self.vocab_size:
            raise ConfigError(f"{self.name} sample {i} holds token id {top} but the model's vocabulary has "
                              f"{self.vocab_size} tokens; tokenize with the model's tokenizer")
        kept = mask > 0  # HF's unshifted labels (a copy of the inputs) would train to repeat the current token
        if int(kept.sum()) >= 4 and torch.equal(labels[kept], ids[kept]) and len(set(ids[kept].tolist())) > 1:
            raise ConfigError(f"{self.name} sample {i} has labels equal to its input_ids; megallama's labels are "
                              "the next token at each position (Megatron's convention): pass input_ids[1:] as "
                              "labels of input_ids[:-1], or seq + 1 token ids without labels")
        return {"input_ids": ids, "labels": labels, "loss_mask": mask}
