"""Layout-independent tensors: every saved tensor is a piece of a *full* tensor named by its HF name.

A rank saves its local shard of each tensor it owns plus where that shard sits in the full tensor: the tensor-
parallel split (partition dim, offset, length — from ``param.partition_dim`` and the tp rank) and, for ZeRO shards,
the element range ``flat = [start, end)`` of the flattened tp-local tensor. Rank 0 merges these into one index in
``common.pt``: ``{name: {"shape": full shape, "dtype", "pieces": [{"file", "dim", "offset", "length"[, "flat",
"local_shape"]}, ...]}}``. Loading with any layout reads, for each local tensor, the pieces that overlap its slice
(files are opened with ``mmap``, so a rank touches only the bytes it reads). That is all resharding is: tp, pp
(layers keep global names), dp, ZeRO stage and virtual stages can all change between save and load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from megallama.errors import ConfigError


@dataclass
class Piece:
    """Where a local tensor sits in its full tensor: ``dim`` None means it *is* the full tensor (or, with
    ``flat``, a flat element range of it)."""
    shape: List[int]  # full shape
    dim: Optional[int] = None
    offset: int = 0
    length: int = 0
    flat: Optional[List[int]] = None  # [start, end) in the flattened tp-local tensor (a ZeRO shard)
    local_shape: Optional[List[int]] = None

    def to_dict(self, file: str) -> dict:
        d = {"file": file, "dim": -1 if self.dim is None else self.dim, "offset": self.offset, "length": self.length}
        if self.flat is not None:
            d["flat"], d["local_shape"] = list(self.flat), list(self.local_shape)
        return d


def piece_of(local: torch.Tensor, param: Optional[torch.Tensor], tp_size: int, tp_rank: int,
             shape: Optional[List[int]] = None) -> Piece:
    """The piece a tp-local tensor (a parameter, or a state shaped like it: pass ``shape`` for a flat one) is,
    from the parameter's tensor-parallel attributes."""
    ref = param if param is not None else local
    local_shape = list(shape if shape is not None else local.shape)
    if getattr(ref, "tensor_model_parallel", False) and tp_size > 1:
        dim = int(getattr(ref, "partition_dim", 0))
        n = local_shape[dim]
        full = list(local_shape)
        full[dim] = n * tp_size
        return Piece(full, dim, tp_rank * n, n)
    return Piece(local_shape)


def merge_indexes(parts: Iterable[Dict[str, dict]]) -> Dict[str, dict]:
    """Union of per-rank ``{name: {"shape", "pieces"}}``; every piece must agree on the full shape."""
    index: Dict[str, dict] = {}
    for part in parts:
        for name, entry in part.items():
            cur = index.setdefault(name, {"shape": list(entry["shape"]), "dtype": entry.get("dtype"), "pieces": []})
            if cur["shape"] != list(entry["shape"]):
                raise RuntimeError(f"ranks disagree on the full shape of {name}: {cur['shape']} vs {entry['shape']}")
            cur["pieces"].extend(entry["pieces"])
    for entry in index.values():
        entry["pieces"].sort(key=lambda p: (p["offset"], p.get("flat", [0])[0], p["file"]))
    return index


@dataclass
class _Logical:
    """A tp piece as the reader sees it: ZeRO flat ranges of one tp-local tensor are grouped into one."""
    dim: Optional[int]
    offset: int
    length: int
    files: List[str]
    load: Callable[[], torch.Tensor]


def _uncovered(spans, lo: int, hi: int) -> bool:
    pos = lo
    for a, b in sorted(spans):
        if a > pos:
            return True
        pos = max(pos, b)
    return pos < hi


class ShardReader:
    """Reads slices of full tensors out of a checkpoint's files, opening each file once (mmap, weights_only)."""

    def __init__(self, ckpt: str, index: Dict[str, dict]):
        self.ckpt, self.index = ckpt, index
        self._files: Dict[str, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def full_shape(self, name: str) -> List[int]:
        return list(self.index[name]["shape"])

    def load_object(self, file: str) -> dict:
        """The whole object saved in ``file`` (tensors and, in rank files, RNG states), loaded once."""
        if file not in self._files:
            path = os.path.join(self.ckpt, file)
            try:
                self._files[file] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise ConfigError(f"checkpoint file {path} is missing; the checkpoint is incomplete — load an "
                                  "earlier iteration") from None
            except Exception as e:  # noqa: BLE001 - corrupt / truncated zip
                raise ConfigError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is corrupt — "
                                  "load an earlier iteration") from None
        return self._files[file]

    def _stored(self, file: str, name: str) -> torch.Tensor:
        return self.load_object(file)["tensors"][name]

    def _logical(self, name: str) -> List[_Logical]:
        out, groups = [], {}
        for p in self.index[name]["pieces"]:
            dim = None if p["dim"] < 0 else p["dim"]
            if "flat" not in p:
                out.append(_Logical(dim, p["offset"], p["length"], [p["file"]],
                                    lambda p=p: self._stored(p["file"], name)))
            else:
                groups.setdefault((p["dim"], p["offset"], p["length"]), []).append(p)
        for (d, off, n), ps in groups.items():
            out.append(_Logical(None if d < 0 else d, off, n, sorted({p["file"] for p in ps}),
                                lambda ps=ps: self._assemble_flat(name, ps)))
        return out

    def _assemble_flat(self, name: str, pieces: List[dict]) -> torch.Tensor:
        shape = pieces[0]["local_shape"]
        numel = 1
        for s in shape:
            numel *= s
        first = self._stored(pieces[0]["file"], name)
        flat = torch.empty(numel, dtype=first.dtype)
        spans = []
        for p in pieces:
            a, z = p["flat"]
            flat[a:z].copy_(self._stored(p["file"], name).reshape(-1))
            spans.append((a, z))
        if _uncovered(spans, 0, numel):
            raise ConfigError(f"checkpoint {self.ckpt} lacks elements of {name} (its ZeRO shards do not cover it); "
                              "it is incomplete — load an earlier iteration")
        return flat.view(shape)

    def _overlapping(self, name, dim, offset, length) -> List[_Logical]:
        return [lp for lp in self._logical(name)
                if lp.dim is None or dim is None or (lp.offset < offset + length and offset < lp.offset + lp.length)]

    def files_for(self, name: str, dim: Optional[int], offset: int, length: int) -> List[str]:
        return sorted({f for lp in self._overlapping(name, dim, offset, length) for f in lp.files})

    def read_into(self, name: str, out: torch.Tensor, dim: Optional[int] = None, offset: int = 0) -> None:
        """Fill ``out`` with the full tensor ``name`` (``dim`` None) or its slice ``[offset, offset+len)`` along
        ``dim``; the saved pieces may be split differently (another tp, ZeRO shards) or be whole tensors."""
        if name not in self.index:
            raise KeyError(name)
        full = self.full_shape(name)
        want = list(out.shape)
        if dim is not None:
            want[dim] = full[dim]
        if want != full:
            raise ConfigError(f"checkpoint tensor {name} has shape {full}, this model needs {want}; the checkpoint "
                              "is of another model")
        length = out.shape[dim] if dim is not None else 0
        spans, split_dim = [], None
        for lp in self._overlapping(name, dim, offset, length):
            src = lp.load()
            if lp.dim is None:  # a whole tensor: slice it
                out.copy_(src if dim is None else src.narrow(dim, offset, length))
                return
            split_dim = lp.dim
            if dim is None:  # want the whole tensor: place each piece
                out.narrow(lp.dim, lp.offset, lp.length).copy_(src)
                spans.append((lp.offset, lp.offset + lp.length))
            elif lp.dim != dim:  # split along another dim: assemble, then slice
                whole = torch.empty(full, dtype=out.dtype)
                self.read_into(name, whole)
                out.copy_(whole.narrow(dim, offset, length))
                return
            else:
                lo, hi = max(offset, lp.offset), min(offset + length, lp.offset + lp.length)
                out.narrow(dim, lo - offset, hi - lo).copy_(src.narrow(dim, lo - lp.offset, hi - lo))
                spans.append((lo, hi))
        lo, hi = (0, full[split_dim] if split_dim is not None else 1) if dim is None else (offset, offset + length)
        if _uncovered(spans, lo, hi):
            raise ConfigError(f"checkpoint {self.ckpt} lacks part of {name} ([{lo}, {hi}) along its split dim); "
                              "it is incomplete — load an earlier iteration")

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full tensor, in its saved dtype unless ``dtype`` is given."""
        entry = self.index[name]
        dt = dtype or (getattr(torch, entry["dtype"]) if entry.get("dtype") else torch.float32)
        out = torch.empty(entry["shape"], dtype=dt)
        self.read_into(name, out)
        return out

    def close(self):
        self._files.clear()


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")
