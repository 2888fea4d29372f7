"""Layout-independent tensors: every saved tensor is a piece of a *full* tensor named by its HF name.

A rank saves its local shard of each tensor it owns plus where that shard sits in the full tensor (partition dim,
offset, length — what ``param.partition_dim`` and the tp rank say). Rank 0 merges these into one index in
``common.pt``: ``{name: {"shape": full shape, "pieces": [{"file", "dim", "offset", "length"}, ...]}}``. Loading with
any layout reads, for each local tensor, the pieces that overlap its slice of the full tensor (files are opened
with ``mmap`` so a rank touches only the bytes it needs). That is all resharding is: tp, pp (layers keep global
names), dp and ZeRO (optimizer states are saved per parameter, not per flat buffer) can all change between save and
load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch

from megallama.errors import ConfigError


@dataclass
class Piece:
    """Where a local tensor sits in its full tensor: ``dim`` None means it *is* the full tensor."""
    shape: List[int]  # full shape
    dim: Optional[int] = None
    offset: int = 0
    length: int = 0

    def to_dict(self, file: str) -> dict:
        return {"file": file, "dim": -1 if self.dim is None else self.dim, "offset": self.offset,
                "length": self.length}


def piece_of(local: torch.Tensor, param: Optional[torch.Tensor], tp_size: int, tp_rank: int) -> Piece:
    """The piece a local tensor (a parameter or a state shaped like it) is, from the parameter's TP attributes."""
    ref = param if param is not None else local
    if getattr(ref, "tensor_model_parallel", False) and tp_size > 1:
        dim = int(getattr(ref, "partition_dim", 0))
        n = local.shape[dim]
        shape = list(local.shape)
        shape[dim] = n * tp_size
        return Piece(shape, dim, tp_rank * n, n)
    return Piece(list(local.shape))


def merge_indexes(parts: Iterable[Dict[str, dict]]) -> Dict[str, dict]:
    """Union of per-rank ``{name: {"shape", "pieces"}}``; the same full shape is required of every piece."""
    index: Dict[str, dict] = {}
    for part in parts:
        for name, entry in part.items():
            cur = index.setdefault(name, {"shape": list(entry["shape"]), "dtype": entry.get("dtype"), "pieces": []})
            if cur["shape"] != list(entry["shape"]):
                raise RuntimeError(f"ranks disagree on the full shape of {name}: {cur['shape']} vs {entry['shape']}")
            cur["pieces"].extend(entry["pieces"])
    for entry in index.values():
        entry["pieces"].sort(key=lambda p: (p["offset"], p["file"]))
    return index


class ShardReader:
    """Reads slices of full tensors out of a checkpoint's files, opening each file once (mmap, weights_only)."""

    def __init__(self, ckpt: str, index: Dict[str, dict]):
        self.ckpt, self.index = ckpt, index
        self._files: Dict[str, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def full_shape(self, name: str) -> List[int]:
        return list(self.index[name]["shape"])

    def files_for(self, name: str, dim: Optional[int], offset: int, length: int) -> List[str]:
        return sorted({p["file"] for p in self._overlapping(name, dim, offset, length)})

    def _overlapping(self, name, dim, offset, length):
        for p in self.index[name]["pieces"]:
            if p["dim"] < 0 or dim is None:
                yield p
            elif p["offset"] < offset + length and offset < p["offset"] + p["length"]:
                yield p

    def _tensors(self, file: str) -> dict:
        return self.load_object(file)["tensors"]

    def load_object(self, file: str) -> dict:
        """The whole object saved in ``file`` (tensors and, in rank files, RNG states), loaded once."""
        if file not in self._files:
            path = os.path.join(self.ckpt, file)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise ConfigError(f"checkpoint file {path} is missing; the checkpoint is incomplete — load an "
                                  "earlier iteration") from None
            except Exception as e:  # noqa: BLE001 - corrupt / truncated zip
                raise ConfigError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is corrupt — "
                                  "load an earlier iteration") from None
            self._files[file] = obj
        return self._files[file]

    def read_into(self, name: str, out: torch.Tensor, dim: Optional[int] = None, offset: int = 0) -> None:
        """Fill ``out`` with the full tensor ``name`` (``dim`` None) or its slice ``[offset, offset+len)`` along
        ``dim``; pieces may be split along the same dim differently (another tp) or be whole tensors."""
        if name not in self.index:
            raise KeyError(name)
        full = self.full_shape(name)
        want = list(out.shape)
        if dim is not None:
            want[dim] = full[dim]
        if want != full:
            raise ConfigError(f"checkpoint tensor {name} has shape {full}, this model needs {want} (sharded along "
                              f"{dim}); the checkpoint is of another model")
        length = out.shape[dim] if dim is not None else 0
        spans = []
        for p in self._overlapping(name, dim, offset, length):
            src = self._tensors(p["file"])[name]
            pdim = None if p["dim"] < 0 else p["dim"]
            if pdim is None:  # a whole tensor: slice it
                out.copy_(src if dim is None else src.narrow(dim, offset, length))
                return
            if dim is None:  # want the whole tensor: place each piece
                out.narrow(pdim, p["offset"], p["length"]).copy_(src)
                spans.append((p["offset"], p["offset"] + p["length"]))
                continue
            if pdim != dim:
                whole = torch.empty(full, dtype=out.dtype)
                self.read_into(name, whole)
                out.copy_(whole.narrow(dim, offset, length))
                return
            lo, hi = max(offset, p["offset"]), min(offset + length, p["offset"] + p["length"])
            out.narrow(dim, lo - offset, hi - lo).copy_(src.narrow(dim, lo - p["offset"], hi - lo))
            spans.append((lo, hi))
        pieces = self.index[name]["pieces"]
        lo, hi = (0, full[pieces[0]["dim"]]) if dim is None and pieces else (offset, offset + length)
        if _uncovered(spans, lo, hi):
            raise ConfigError(f"checkpoint {self.ckpt} lacks part of {name} (rows {lo}..{hi} along its split "
                              "dim); it is incomplete — load an earlier iteration")

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full tensor, in its saved dtype unless ``dtype`` is given."""
        entry = self.index[name]
        dt = dtype or _dtype(entry.get("dtype")) or torch.float32
        out = torch.empty(entry["shape"], dtype=dt)
        self.read_into(name, out)
        return out

    def close(self):
        self._files.clear()


def _uncovered(spans, lo: int, hi: int) -> bool:
    pos = lo
    for a, b in sorted(spans):
        if a > pos:
            return True
        pos = max(pos, b)
    return pos < hi


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return getattr(torch, name) if name else None
