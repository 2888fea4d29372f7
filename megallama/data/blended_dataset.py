"""Weighted blends of pretraining corpora: Megatron's ``--data-path 0.3 web 0.7 code``, and ``--data-path a b``
(weights in proportion to the corpora's sizes, as Megatron's: one epoch of the blend is one epoch of each); the same
for each of ``--train/--valid/--test-data-path``.

Each corpus is its own ``GPTDataset`` (own split, own shuffles); the blend interleaves them in proportion to the
weights. Corpus d's k-th sample sits at the ideal position (k + 1/2) / w_d of an endless merged stream, and the
blend is that stream's first N samples, so sample i is the same whatever N a run asks for (resuming and extending
a run stay exact, as for one corpus), and after any prefix each corpus is within one sample of its share.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from megallama.errors import ConfigError


def parse_data_blend(values: Sequence[str], flag: str = "--data-path") -> List[Tuple[Optional[float], str]]:
    """``[w1, p1, w2, p2, ...]`` -> [(normalised weight, path)]; ``[p1, p2, ...]`` -> [(None, path)]: weighted by
    size, as Megatron does (get_blend_from_list, then each prefix's length as its weight)."""
    values = list(values)

    def number(v):
        try:
            return float(v)
        except ValueError:
            return None
    if len(values) % 2 == 0 and all(number(v) is not None for v in values[0::2]):
        pairs = [(number(w), p) for w, p in zip(values[0::2], values[1::2])]
    elif all(number(v) is None for v in values):
        return [(None, p) for p in values]
    else:
        raise ConfigError(f"{flag} {' '.join(values)} is neither paths nor weight-path pairs; write weight-path "
                          "pairs, e.g. 0.3 web_text_document 0.7 code_text_document (or paths alone, weighted by size)")
    if any(w <= 0 or not math.isfinite(w) for w, _ in pairs):
        raise ConfigError(f"{flag} weights must be positive, got {[w for w, _ in pairs]}; give each corpus a weight "
                          "> 0 (leave out a corpus not to train on)")
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def _renormalised(weights: Sequence[Optional[float]]) -> List[Optional[float]]:
    """A subset's weights summing to 1 again; None (weighted by size) stays None."""
    if any(w is None for w in weights):
        return [None] * len(weights)
    total = sum(weights)
    return [w / total for w in weights]


def blend_datasets(parts: Sequence, weights: Sequence[Optional[float]], num_samples: Optional[int]):
    """The blend of ``parts`` (each of one epoch's length, readable beyond it). Weights None: each part's length
    (Megatron's blend without weights). ``num_samples`` None: one epoch of the blend, as long as it takes to see
    every part's epoch at its weight (without weights: exactly the parts' epochs, each sample once)."""
    if any(w is None for w in weights):
        epoch = sum(len(p) for p in parts)
        weights = [len(p) / epoch for p in parts]
    else:
        epoch = max(int(math.ceil(len(p) / w)) for p, w in zip(parts, weights))
    return BlendedDataset(parts, weights, epoch if num_samples is None else num_samples, samples_per_epoch=epoch)


def blend_index(weights: Sequence[float], num_samples: int) -> Tuple[np.ndarray, np.ndarray]:
    """(corpus, sample within it) of each of the first ``num_samples`` samples of the blend."""
    corpus, position = [], []
    for d, w in enumerate(weights):
        k = np.arange(int(math.ceil(w * num_samples)) + 2, dtype=np.int64)
        corpus.append(np.full(len(k), d, dtype=np.int64))
        position.append((k + 0.5) / w)
    corpus, position = np.concatenate(corpus), np.concatenate(position)
    order = np.lexsort((corpus, position))[:num_samples]  # by position, ties to the earlier corpus
    corpus = corpus[order]
    sample = np.zeros(num_samples, dtype=np.int64)
    for d in range(len(weights)):
        at = corpus == d
        sample[at] = np.arange(int(at.sum()))
    return corpus, sample


class BlendedDataset(torch.utils.data.Dataset):
    """``num_samples`` of the blend; readable beyond them (the index is prefix-stable, so it extends), which
    ``--dataloader-type cyclic`` uses: it shuffles per ``samples_per_epoch`` (one epoch of the blend, a size
    that does not depend on the run's length), so a longer or resumed run reads on in the same order."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int,
                 samples_per_epoch: Optional[int] = None):
        self.datasets, self.weights, self.num_samples = list(datasets), list(weights), int(num_samples)
        self.samples_per_epoch = int(samples_per_epoch or num_samples)
        self.corpus, self.sample = blend_index(self.weights, self.num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if idx >= len(self.corpus):
            self.corpus, self.sample = blend_index(self.weights, max(idx + 1, 2 * len(self.corpus)))
        return self.datasets[int(self.corpus[idx])][int(self.sample[idx])]


def build_blended_datasets(blend: Sequence[Tuple[Optional[float], str]], tokenizer, seq_length: int, seed: int,
                           split: str, cache_dir: Optional[str], num_train_samples: Optional[int],
                           num_valid_samples: Optional[int] = None):
    """(train, valid) blends: each corpus split as one would be, the valid blend over the corpora whose split
    holds validation documents (weights renormalised). ``num_train_samples`` None: one epoch of the blend."""
    from megallama.data.gpt_dataset import build_pretraining_datasets
    weights = [w for w, _ in blend]
    parts = [build_pretraining_datasets(path, tokenizer, seq_length, seed + 7919 * d, split, cache_dir)
             for d, (_, path) in enumerate(blend)]
    train = blend_datasets([t for t, _ in parts], weights, num_train_samples)
    if num_train_samples is not None:  # the run's size (None: one epoch of the blend, to size --epochs)
        note_part_epochs(train, [p for _, p in blend], seq_length)
    valid_parts = [(w, v) for w, (_, v) in zip(weights, parts) if v is not None]
    valid = None
    if valid_parts:
        n = num_valid_samples or (None if weights[0] is None else max(len(v) for _, v in valid_parts))
        valid = blend_datasets([v for _, v in valid_parts], _renormalised([w for w, _ in valid_parts]), n)
    return train, valid


def build_blended_test_dataset(blend: Sequence[Tuple[Optional[float], str]], tokenizer, seq_length: int, seed: int,
                               split: str, cache_dir: Optional[str], num_samples: Optional[int]):
    """The test blend: each corpus's third --split share (as one corpus's test set), over the corpora that have
    one, weights renormalised; None when none has."""
    from megallama.data.gpt_dataset import build_test_split
    parts = [(w, build_test_split(path, tokenizer, seq_length, seed + 7919 * d, split, cache_dir, None))
             for d, (w, path) in enumerate(blend)]
    parts = [(w, t) for w, t in parts if t is not None]
    if not parts:
        return None
    n = num_samples or (None if parts[0][0] is None else max(len(t) for _, t in parts))
    return blend_datasets([t for _, t in parts], _renormalised([w for w, _ in parts]), n)


def build_corpora_blend(blend: Sequence[Tuple[Optional[float], str]], tokenizer, seq_length: int, seed: int,
                        cache_dir: Optional[str], num_samples: Optional[int], name: str, salt: int):
    """One split's blend of whole corpora (Megatron's ``--train-data-path 0.3 a 0.7 b``): corpus d read whole, seeded
    seed + 7919 d as --data-path's corpora are. One corpus is that corpus itself, with the run's seed."""
    from megallama.data.gpt_dataset import build_dataset_from_path
    if len(blend) == 1:
        return build_dataset_from_path(blend[0][1], tokenizer, seq_length, seed, cache_dir, num_samples, name, salt)
    parts = [build_dataset_from_path(path, tokenizer, seq_length, seed + 7919 * d, cache_dir, None, name, salt)
             for d, (_, path) in enumerate(blend)]
    out = blend_datasets(parts, [w for w, _ in blend], num_samples)
    if name == "train" and num_samples is not None:
        note_part_epochs(out, [p for _, p in blend], seq_length)
    return out


def note_part_epochs(blend: BlendedDataset, paths: Sequence[str], seq_length: int) -> None:
    """The training blend's line per corpus whose share of the run's samples needs it more than once."""
    from megallama.data.dataset_notes import note_epochs
    for d, (part, path) in enumerate(zip(blend.datasets, paths)):
        note_epochs(f"train split of {path}", part.samples_per_epoch, seq_length, int((blend.corpus == d).sum()))
