"""Pretraining samples packed from documents, Megatron-style, and the entry point the training loop calls.

Documents (already ending in eod, see preprocess) are split into train/valid/test by contiguous document ranges
(``--split 98,2,0``, Megatron's rounding, counting the documents that hold tokens: an empty one moves no boundary).
Within a split, each epoch is built on its own from (seed, split, epoch): shuffle the documents, lay them end to
end, cut the stream into samples of ``seq_length + 1`` tokens that overlap by one token (sample k starts at token k
* seq_length, so every token is an input exactly once per epoch; the last < seq_length tokens are dropped), then
shuffle the samples. Epochs never depend on how many are asked for, so sample i is the same whatever the run length:
that is what makes resuming and extending a run exact.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import numpy as np
import torch

from megallama.data.dataset_notes import check_documents_end_in_eod, note_epochs, warn_once
from megallama.data.indexed_dataset import IndexedDataset, read_tokenizer_info
from megallama.data.samplers import MegatronPretrainingSampler, build_data_iterator, collate  # noqa: F401
from megallama.data.tokenizer import file_sha256
from megallama.errors import ConfigError

_CACHE_FORMAT = "megallama-gpt-cache-v2"  # v2: a tokenizer record; HF special-token text is plain
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split) -> list[float]:
    """"98,2,0" (or "98/2/0", or a list) -> three fractions summing to 1."""
    parts = split if isinstance(split, (list, tuple)) else str(split).replace("/", ",").split(",")
    try:
        vals = [float(p) for p in parts if str(p).strip() != ""]
    except ValueError:
        raise ConfigError(f"--split {split!r} is not numbers; write it like 98,2,0") from None
    if not 1 <= len(vals) <= 3 or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ConfigError(f"--split {split!r} needs 1 to 3 non-negative weights with a positive sum, like 98,2,0")
    vals += [0.0] * (3 - len(vals))
    return [v / sum(vals) for v in vals]


def split_document_ranges(num_documents: int, split) -> list[tuple[int, int]]:
    """[start, end) document ranges of train/valid/test, rounded as Megatron does (the rounding error goes last)."""
    bounds = [0]
    for frac in parse_split(split):
        bounds.append(bounds[-1] + int(round(frac * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def split_ranges(indexed: IndexedDataset, split) -> list[tuple[int, int]]:
    """``split_document_ranges`` over the documents that hold tokens, as [start, end) ranges of all documents.
    Megatron's GPT datasets split by sequence, so an empty document (zero sequences: an empty text) moves no
    boundary; for data with one sequence per document this is Megatron's split exactly."""
    di = np.asarray(indexed.document_indices, dtype=np.int64)
    full = np.flatnonzero(np.diff(di) > 0)  # the documents with sequences
    edge = np.append(full, len(di) - 1)  # the k-th full document's index; past the last: the end
    return [(0 if a == 0 else int(edge[a]), int(edge[b])) for a, b in split_document_ranges(len(full), split)]


class GPTDataset(torch.utils.data.Dataset):
    """Packed samples over the sequences of ``document_ids`` (``[start, end)`` range of documents) of an indexed
    dataset. ``ds[i]`` works for any i >= 0 (later epochs are built on demand); ``len`` is ``num_samples`` if given,
    else one epoch."""

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_length: int, seed: int,
                 num_samples: int | None = None, name: str = "train", salt: int = 0):
        if seq_length <= 0:
            raise ConfigError(f"--seq-length {seq_length} must be positive")
        self.indexed, self.seq_length, self.seed, self.name, self.salt = indexed, seq_length, seed, name, salt
        d0, d1 = document_range
        di = indexed.document_indices
        self.units = np.arange(int(di[d0]), int(di[d1]), dtype=np.int64)  # the sequences of these documents
        self.unit_lengths = indexed.sequence_lengths[self.units].astype(np.int64)
        self.num_tokens = int(self.unit_lengths.sum())
        self.samples_per_epoch = max((self.num_tokens - 1) // seq_length, 0)
        if self.samples_per_epoch == 0:
            raise ConfigError(f"the {name} split of {indexed.prefix} holds {self.num_tokens} tokens, fewer than "
                              f"--seq-length + 1 = {seq_length + 1}; use a shorter --seq-length or more data")
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        self._epochs: OrderedDict[int, tuple] = OrderedDict()

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_epochs(self) -> int:
        return -(-self.num_samples // self.samples_per_epoch)

    def _rng(self, epoch: int) -> np.random.RandomState:
        # RandomState's streams are frozen by numpy's compatibility policy: the same order on every version.
        return np.random.RandomState([self.seed & 0xFFFFFFFF, self.salt, epoch])

    def epoch_index(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, token offsets of the laid-out documents, sample shuffle) of one epoch."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        rng = self._rng(epoch)
        order = rng.permutation(len(self.units))
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(self.unit_lengths[order], out=offsets[1:])
        shuffle = rng.permutation(self.samples_per_epoch)
        self._epochs[epoch] = (order, offsets, shuffle)
        if len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample idx."""
        if idx < 0:
            raise IndexError(f"sample index {idx} < 0")
        epoch, k = divmod(int(idx), self.samples_per_epoch)
        order, offsets, shuffle = self.epoch_index(epoch)
        pos, need = int(shuffle[k]) * self.seq_length, self.seq_length + 1
        j = int(np.searchsorted(offsets, pos, side="right")) - 1
        pieces, off = [], pos - int(offsets[j])
        while need > 0:
            unit = int(self.units[order[j]])
            n = min(int(self.unit_lengths[order[j]]) - off, need)
            pieces.append(self.indexed.get(unit, off, n))
            need -= n
            j, off = j + 1, 0
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def __getitem__(self, idx: int) -> dict:
        tokens = torch.from_numpy(self.sample_tokens(idx).astype(np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:],
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float32)}


def build_dataset_from_path(data: str, tokenizer, seq_length: int, seed: int, cache_dir: str | None,
                            num_samples: int | None, name: str, salt: int, progress: bool = True) -> GPTDataset:
    """A GPTDataset over every document of one corpus (Megatron's --train/--valid/--test-data-path, which take
    whole corpora instead of --split shares of one). Collective under torch.distributed."""
    indexed = _open_corpus(data, tokenizer, cache_dir, progress)
    ds = GPTDataset(indexed, (0, indexed.num_documents), seq_length, seed, num_samples, name, salt=salt)
    if name == "train":
        note_epochs("train split", ds.samples_per_epoch, seq_length, num_samples)
    return ds


def _open_corpus(data: str, tokenizer, cache_dir: str | None, progress: bool) -> IndexedDataset:
    """The corpus (a jsonl tokenized once into the cache, or a .bin/.idx prefix), refused when empty or tokenized
    with a larger vocabulary than ``tokenizer``'s; a warning when its documents do not end in the eod."""
    indexed = IndexedDataset(_resolve_prefix(data, tokenizer, cache_dir, progress))
    if indexed.num_documents == 0 or indexed.num_tokens == 0:
        raise ConfigError(f"{data} holds no documents; give it at least one non-empty text")
    _check_vocab(indexed, tokenizer)
    check_documents_end_in_eod(indexed, tokenizer)
    return indexed


def build_test_split(data: str, tokenizer, seq_length: int, seed: int, split, cache_dir: str | None,
                     num_samples: int | None) -> GPTDataset | None:
    """The test share of ``--split`` (its third weight) of one corpus; None when it holds no documents."""
    indexed = IndexedDataset(_resolve_prefix(data, tokenizer, cache_dir, False))
    lo, hi = split_ranges(indexed, split)[2]
    if indexed.document_indices[hi] <= indexed.document_indices[lo]:
        return None
    try:
        return GPTDataset(indexed, (lo, hi), seq_length, seed, num_samples, "test", salt=2)
    except ConfigError as e:  # too few test tokens for one sample
        warn_once(f"no test set: {e}")
        return None


def _jsonl_cache_prefix(path: str, tokenizer, cache_dir: str) -> str:
    """Cache key: the file's size and content hash and the tokenizer's fingerprint (not the path or mtime: a copy of
    the same file reuses the cache, an edited one does not)."""
    key = hashlib.sha256("|".join([_CACHE_FORMAT, str(os.path.getsize(path)), file_sha256(path),
                                   tokenizer.fingerprint + getattr(tokenizer, "special_ids_key", ""),
                                   "eod"]).encode()).hexdigest()[:16]
    stem = os.path.basename(path)
    for suf in _JSONL_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    return os.path.join(cache_dir, f"{stem}-{key}")


def _cache_is_current(prefix: str, special: bool) -> bool:
    """A cache made with other encode options is rebuilt, never reused: its tokenizer record says how it was made
    (an HF cache of megallama before the bos fix has no "add_special_tokens": its documents lack the bos)."""
    if not IndexedDataset.exists(prefix):
        return False
    try:
        info = read_tokenizer_info(prefix)
    except ConfigError:  # an unreadable record (cut off mid-write): ours to rebuild
        return False
    return bool((info or {}).get("add_special_tokens", False)) == special


def _dist_info():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist, int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    return None, True


def tokenize_jsonl_cached(path: str, tokenizer, cache_dir: str | None = None, workers: int = 1,
                          progress: bool = True) -> str:
    """Tokenize a jsonl once into cache_dir and return the .bin/.idx prefix; later calls reuse it. The same bytes
    as ``tools/preprocess_data.py --append-eod`` with the same tokenizer (an HF tokenizer.json's bos included).
    Collective under torch.distributed (every rank must call it): local rank 0 builds, the others wait at a
    barrier."""
    from megallama.data.preprocess import adds_special_tokens, output_prefix_for, preprocess_jsonl
    if not os.path.isfile(path):
        raise ConfigError(f"data file not found: {path}; pass an existing .jsonl file or a .bin/.idx prefix")
    cache_dir = cache_dir or os.path.join(os.getcwd(), "data_cache")
    base = _jsonl_cache_prefix(path, tokenizer, cache_dir)
    prefix = output_prefix_for(base, "text")
    special = adds_special_tokens(tokenizer)
    dist, builder = _dist_info()
    error = None
    if builder and not _cache_is_current(prefix, special):
        try:
            os.makedirs(cache_dir, exist_ok=True)
            preprocess_jsonl(path, base, tokenizer, workers=workers, json_keys=("text",), append_eod=True,
                             progress=progress, overwrite=True,  # our cache: a half-written or stale pair is rebuilt
                             caller="pretrain",  # its errors name pretraining's fixes, not --json-keys
                             add_special_tokens=special)
        except Exception as e:  # reach the barrier first, so the other ranks do not hang
            error = e
    if dist is not None:
        dist.barrier()
    if error is not None:
        raise error
    if not IndexedDataset.exists(prefix):
        raise ConfigError(f"tokenizing {path} failed on the rank that builds {cache_dir}; see its error above")
    return prefix


def existing_prefix(data: str) -> str | None:
    """The .bin/.idx prefix ``data`` names (the prefix itself or either file of the pair); None when there is none."""
    for suffix in (".bin", ".idx"):
        if data.endswith(suffix) and IndexedDataset.exists(data[: -len(suffix)]):
            return data[: -len(suffix)]
    return data if IndexedDataset.exists(data) else None


def _resolve_prefix(data: str, tokenizer, cache_dir, progress: bool) -> str:
    if data.endswith(_JSONL_SUFFIXES):
        return tokenize_jsonl_cached(data, tokenizer, cache_dir, progress=progress)
    prefix = existing_prefix(data)
    if prefix is not None:
        return prefix
    if os.path.isfile(data):  # a jsonl under another name
        return tokenize_jsonl_cached(data, tokenizer, cache_dir, progress=progress)
    raise ConfigError(f"data not found: {data}; pass an existing .jsonl file or the prefix of a .bin/.idx pair "
                      f"(for x_text_document.bin/.idx pass x_text_document)")


def _check_vocab(indexed: IndexedDataset, tokenizer) -> None:
    """Refuse data made with another tokenizer: by its tokenizer record when preprocess wrote one (ids of another
    tokenizer are wrong even below the vocabulary size), else (Megatron's data) by the largest token id."""
    info = read_tokenizer_info(indexed.prefix)
    run = getattr(tokenizer, "fingerprint", None)
    if info is not None and run:
        if info["fingerprint"] != run:
            raise ConfigError(_other_tokenizer(indexed.prefix, info, tokenizer))
        eod = info.get("eod_id")  # recorded since the HF tokenizer's eos can change with its tokenizer_config.json
        if info.get("append_eod") and eod is not None and eod != tokenizer.eod:
            raise ConfigError(f"{indexed.prefix} ends its documents with token {eod} but this run's tokenizer ends "
                              f"text with {tokenizer.eod} (its eos_token); re-run tools/preprocess_data.py with this "
                              f"run's tokenizer, or train with the one the data was made with")
        return
    if indexed.num_tokens == 0 or indexed.num_tokens > 200_000_000:  # a full scan of huge data is not worth it
        return
    top = int(np.frombuffer(indexed._bin, dtype=indexed.dtype, count=indexed.num_tokens).max())
    if top >= tokenizer.vocab_size:
        raise ConfigError(f"{indexed.prefix} holds token id {top} but tokenizer '{tokenizer.name}' has only "
                          f"{tokenizer.vocab_size} tokens; preprocess the data with the same tokenizer")


def _other_tokenizer(prefix: str, info: dict, tokenizer) -> str:
    made, run = str(info.get("name")), str(getattr(tokenizer, "name", "?"))
    if made == run:  # same name, other file (e.g. a retrained tokenizer): the fingerprints tell them apart
        made, run = f"{made} [{info['fingerprint'][:20]}]", f"{run} [{tokenizer.fingerprint[:20]}]"
    flags = f"--tokenizer-type {info.get('tokenizer_type')}"
    if info.get("tokenizer_model"):
        flags += f" --tokenizer-model {info['tokenizer_model']}"
    return (f"{prefix} was tokenized with '{made}' but this run uses '{run}'; re-run tools/preprocess_data.py with "
            f"this run's tokenizer, or train with the one it was made with ({flags})")


def build_pretraining_datasets(data: str, tokenizer, seq_length: int, seed: int, split="98,2,0",
                               cache_dir: str | None = None, num_train_samples: int | None = None,
                               num_valid_samples: int | None = None, progress: bool = True):
    """(train, valid) GPTDatasets from a .jsonl (tokenized once into ``cache_dir``, default ./data_cache) or a
    .bin/.idx prefix. valid is None when its split holds no documents. Collective under torch.distributed."""
    if not data:
        raise ConfigError("no data given; pass --data-path with a .jsonl file or a .bin/.idx prefix")
    indexed = _open_corpus(data, tokenizer, cache_dir, progress)
    ranges = split_ranges(indexed, split)
    di = indexed.document_indices
    if di[ranges[0][1]] <= di[ranges[0][0]]:
        raise ConfigError(f"--split {split} leaves no training documents out of {indexed.num_documents}; "
                          f"give the first weight more")
    train = GPTDataset(indexed, ranges[0], seq_length, seed, num_train_samples, "train", salt=0)
    note_epochs("train split", train.samples_per_epoch, seq_length, num_train_samples)
    valid = None
    if di[ranges[1][1]] > di[ranges[1][0]]:
        try:
            valid = GPTDataset(indexed, ranges[1], seq_length, seed, num_valid_samples, "valid", salt=1)
        except ConfigError as e:  # too few validation tokens for one sample: train without eval rather than fail
            warn_once(f"no validation set: {e}")
    return train, valid
