"""Megatron-LM's ``MMapIndexedDataset`` on-disk format (.bin tokens + .idx index), written and read with numpy mmap,
so that files made here are read by Megatron-LM and the other way round.

.idx layout (little endian), as in megatron/core/datasets/indexed_dataset.py:
    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    u64      version 1
    u8       dtype code of the tokens in .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
             8 uint16)
    u64      sequence count S
    u64      document count D + 1 (the document index starts with 0)
    int32[S] sequence lengths (tokens)
    int64[S] sequence pointers (byte offsets into .bin)
    int64[D+1] document indices: document d is sequences [doc_idx[d], doc_idx[d+1])
.bin is the tokens of all sequences back to back in that dtype. Without sentence splitting (ours), each document is
one sequence.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import numpy as np

from megallama.errors import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
TOKENIZER_INFO_FORMAT = "megallama-tokenizer-info-v1"


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def get_tokenizer_info_path(prefix: str) -> str:
    """megallama's sidecar next to a .bin/.idx pair: which tokenizer made it (Megatron's format has no such field,
    and ids from another tokenizer train silently while they stay below its vocabulary size)."""
    return prefix + ".tokenizer-info.json"


def tokenizer_info(tokenizer, **extra) -> dict | None:
    """The sidecar's content for ``tokenizer``; None for an object without a fingerprint (nothing to compare)."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if not fingerprint:
        return None
    kind, model = getattr(tokenizer, "_build_args", (getattr(tokenizer, "tokenizer_type", None), None))
    return {"format": TOKENIZER_INFO_FORMAT, "name": getattr(tokenizer, "name", str(kind)),
            "fingerprint": fingerprint, "vocab_size": getattr(tokenizer, "vocab_size", None),
            "tokenizer_type": kind, "tokenizer_model": os.path.abspath(model) if model else None,
            "eod_id": getattr(tokenizer, "eod", None), **extra}


def read_tokenizer_info(prefix: str) -> dict | None:
    """The sidecar of ``prefix``, or None when it has none (made by Megatron or an older megallama)."""
    path = get_tokenizer_info_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), str):
            raise ValueError("no 'fingerprint' string")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a tokenizer record of tools/preprocess_data.py ({str(e).splitlines()[0]});"
                          f" re-run tools/preprocess_data.py, or delete it to fall back to the token-id range check")\
            from None
    return info


def optimal_dtype(vocab_size: int | None):
    """Megatron's choice: uint16 tokens while the vocabulary fits (< 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def write_index(idx_path: str, dtype, sequence_lengths, document_indices) -> None:
    """Write a .idx file for sequences of the given lengths, laid out back to back in .bin."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", _CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Streams documents into a .bin file; ``finalize`` writes the .idx. Same calls as Megatron's builder."""

    def __init__(self, bin_path: str, dtype=np.int32):
        if np.dtype(dtype) not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {dtype}; use one of "
                             f"{sorted(str(np.dtype(d)) for d in _CODE_OF)}")
        self.dtype = np.dtype(dtype)
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._max = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_item(self, tokens) -> None:
        """One sequence (call ``end_document`` after the last sequence of a document)."""
        arr = np.asarray(tokens)
        if self._max is not None and arr.size and (arr.max() > self._max or arr.min() < 0 and self.dtype.kind == "u"):
            raise ValueError(f"token id {int(arr.max())} does not fit {self.dtype}; build with a wider dtype")
        arr = arr.astype(self.dtype, copy=False)
        self.data_file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Iterable[int] | None = None) -> None:
        """A whole document: one sequence, or several if ``lengths`` splits it (Megatron's sentence splitting)."""
        arr = np.asarray(tokens)
        lengths = [int(arr.size)] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"lengths {lengths} do not add up to the document's {arr.size} tokens")
        start = 0
        for n in lengths:
            self.add_item(arr[start:start + n])
            start += n
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (same dtype): merges shards written by separate workers."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix} holds {other.dtype} tokens, this builder {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(n) for n in other.sequence_lengths)
        self.document_indices.extend(int(d) + offset for d in other.document_indices[1:])
        with open(get_bin_path(prefix), "rb") as f:
            while block := f.read(1 << 24):
                self.data_file.write(block)
        del other

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices)


def _mmap(path: str) -> np.ndarray:
    if os.path.getsize(path) == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, mode="r", order="C")


class IndexedDataset:
    """Read-only view of a .bin/.idx pair: ``ds[i]`` is sequence i's tokens (a numpy view into the mmap),
    ``ds.get(i, offset, length)`` a piece of it, ``ds.document_indices`` the document boundaries."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise ConfigError(f"indexed dataset file not found: {p}; pass the prefix of an existing .bin/.idx "
                                  f"pair (made by tools/preprocess_data.py) or a .jsonl file")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ConfigError(f"{idx_path} is not a Megatron MMapIndexedDataset index (bad magic); "
                              f"regenerate it with tools/preprocess_data.py")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION or code not in DTYPE_CODES:
            raise ConfigError(f"{idx_path} has version {version} / dtype code {code}; expected version 1 and a code "
                              f"in 1..8: regenerate it with tools/preprocess_data.py")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx = _mmap(idx_path)
        off = HEADER_BYTES
        need = off + n_seq * 4 + n_seq * 8 + n_doc * 8
        if self._idx.size < need:
            raise ConfigError(f"{idx_path} is truncated ({self._idx.size} bytes, header says {need}); regenerate it")
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=n_seq, offset=off)
        off += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=n_seq, offset=off)
        off += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off)
        self._bin = _mmap(bin_path)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if self._bin.size < end or (n_doc and self.document_indices[-1] != n_seq):
            raise ConfigError(f"{bin_path} does not match {idx_path} (truncated or from another run); regenerate both "
                              f"with tools/preprocess_data.py")

    def __getstate__(self):  # reopen the maps in DataLoader workers instead of pickling the data
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        n = int(self.sequence_lengths[idx])
        length = n - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of sequence {idx} of length {n}")
        ptr = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=ptr)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an indexed dataset must be contiguous")
            lengths = self.sequence_lengths[start:stop]
            if len(lengths) == 0:
                return []
            flat = np.frombuffer(self._bin, dtype=self.dtype, count=int(lengths.sum()),
                                 offset=int(self.sequence_pointers[start]))
            return np.split(flat, np.cumsum(lengths)[:-1])
        return self.get(int(idx))

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(get_idx_path(prefix)) and os.path.isfile(get_bin_path(prefix))
