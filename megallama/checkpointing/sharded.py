"""Layout-independent tensors: every saved tensor is a piece of a *full* tensor named by its HF name.

A piece is a box of the full tensor — ``offsets`` and ``lengths`` per dim — so a tensor split along one dim by
tensor parallelism (``param.partition_dim``) and along another by expert parallelism
(``param.expert_partition_dim``) is described exactly. A ZeRO shard is an element range ``flat = [start, end)`` of
the flattened box. Rank 0 merges every rank's pieces into one index in ``common.pt``:
``{name: {"shape": full shape, "dtype", "pieces": [{"file", "offsets", "lengths"[, "flat"]}, ...]}}``.
Loading with any layout copies, for each local tensor, the intersection of its box with every saved box (files are
opened with ``mmap``, so a rank touches only the bytes it reads). That is all resharding is: tp, pp (layers keep
global names), dp, ZeRO stage, ep and virtual stages can all change between save and load.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from megallama.errors import ConfigError


@dataclass
class Piece:
    """A box of a full tensor (and optionally a flat element range of that box, for ZeRO shards)."""
    shape: List[int]  # the full tensor's shape
    offsets: List[int]
    lengths: List[int]
    flat: Optional[List[int]] = None

    def to_dict(self, file: str) -> dict:
        d = {"file": file, "offsets": list(self.offsets), "lengths": list(self.lengths)}
        if self.flat is not None:
            d["flat"] = list(self.flat)
        return d

    def with_flat(self, start: int, end: int) -> "Piece":
        return Piece(self.shape, self.offsets, self.lengths, [start, end])


def whole(shape: Sequence[int]) -> Piece:
    return Piece(list(shape), [0] * len(shape), list(shape))


def piece_of(local: Optional[torch.Tensor], param: Optional[torch.Tensor], tp_size: int, tp_rank: int,
             ep_size: int = 1, ep_rank: int = 0, shape: Optional[Sequence[int]] = None) -> Piece:
    """The box a tp/ep-local tensor (a parameter, or a state shaped like it: pass ``shape`` for a flat one) is,
    from the parameter's parallel attributes."""
    ref = param if param is not None else local
    lengths = list(shape if shape is not None else local.shape)
    full, offsets = list(lengths), [0] * len(lengths)
    splits = []
    if getattr(ref, "tensor_model_parallel", False) and tp_size > 1:
        splits.append((int(getattr(ref, "partition_dim", 0)), tp_size, tp_rank))
    if getattr(ref, "expert_parallel", False) and ep_size > 1:
        splits.append((int(getattr(ref, "expert_partition_dim", 0)), ep_size, ep_rank))
    for dim, size, rank in splits:
        offsets[dim] = rank * lengths[dim]
        full[dim] = lengths[dim] * size
    return Piece(full, offsets, lengths)


def merge_indexes(parts: Iterable[Dict[str, dict]]) -> Dict[str, dict]:
    """Union of per-rank ``{name: {"shape", "dtype", "pieces"}}``; every piece must agree on the full shape."""
    index: Dict[str, dict] = {}
    for part in parts:
        for name, entry in part.items():
            cur = index.setdefault(name, {"shape": list(entry["shape"]), "dtype": entry.get("dtype"), "pieces": []})
            if cur["shape"] != list(entry["shape"]):
                raise RuntimeError(f"ranks disagree on the full shape of {name}: {cur['shape']} vs {entry['shape']}")
            cur["pieces"].extend(entry["pieces"])
    for entry in index.values():
        entry["pieces"].sort(key=lambda p: (p["offsets"], p.get("flat", [0])[0], p["file"]))
    return index


@dataclass
class _Box:
    """A saved box as the reader sees it (ZeRO flat ranges of one box grouped into one)."""
    offsets: List[int]
    lengths: List[int]
    files: List[str]
    load: Callable[[], torch.Tensor]


def _intersect(a_off, a_len, b_off, b_len):
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a_off, a_len, b_off, b_len)]
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return None
    return lo, [h - lo_ for lo_, h in zip(lo, hi)]


def _narrow(t: torch.Tensor, starts, lengths) -> torch.Tensor:
    for d, (s, n) in enumerate(zip(starts, lengths)):
        t = t.narrow(d, s, n)
    return t


class ShardReader:
    """Reads any box of a full tensor out of a checkpoint's files, opening each file once (mmap, weights_only)."""

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

    def _boxes(self, name: str) -> List[_Box]:
        """The saved boxes of ``name``; a box saved twice counts once (Chimera checkpoints of before 2026-11-26
        wrote both replicas of every tensor)."""
        out, groups, seen = [], {}, set()
        for p in self.index[name]["pieces"]:
            key = (tuple(p["offsets"]), tuple(p["lengths"]), tuple(p.get("flat", ())))
            if key in seen:
                continue
            seen.add(key)
            if "flat" not in p:
                out.append(_Box(p["offsets"], p["lengths"], [p["file"]], lambda p=p: self._stored(p["file"], name)))
            else:
                groups.setdefault((tuple(p["offsets"]), tuple(p["lengths"])), []).append(p)
        for (off, n), ps in groups.items():
            out.append(_Box(list(off), list(n), sorted({p["file"] for p in ps}),
                            lambda ps=ps, n=n: self._assemble_flat(name, ps, list(n))))
        return out

    def _assemble_flat(self, name: str, pieces: List[dict], lengths: List[int]) -> torch.Tensor:
        numel = math.prod(lengths)
        flat = torch.empty(numel, dtype=self._stored(pieces[0]["file"], name).dtype)
        covered = 0
        for p in pieces:
            a, z = p["flat"]
            flat[a:z].copy_(self._stored(p["file"], name).reshape(-1))
            covered += z - a
        if covered != numel:  # dp ranks own disjoint ranges: they must add up to the box
            raise ConfigError(f"checkpoint {self.ckpt} lacks elements of {name} (its ZeRO shards cover {covered} "
                              f"of {numel}); it is incomplete — load an earlier iteration")
        return flat.view(lengths)

    def _overlapping(self, name, offsets, lengths):
        for box in self._boxes(name):
            hit = _intersect(offsets, lengths, box.offsets, box.lengths)
            if hit is not None:
                yield box, hit

    def files_for(self, name: str, piece: Piece) -> List[str]:
        return sorted({f for box, _ in self._overlapping(name, piece.offsets, piece.lengths) for f in box.files})

    def read_into(self, name: str, out: torch.Tensor, piece: Optional[Piece] = None) -> None:
        """Fill ``out`` with the box ``piece`` of the full tensor ``name`` (the whole tensor when None), from
        saved boxes that may be split differently (another tp/ep, ZeRO shards, whole tensors)."""
        if name not in self.index:
            raise KeyError(name)
        full = self.full_shape(name)
        piece = piece or whole(out.shape)
        if piece.shape != full or list(out.shape) != list(piece.lengths):
            raise ConfigError(f"checkpoint tensor {name} has shape {full}, this model needs {piece.shape}; the "
                              "checkpoint is of another model")
        covered = 0
        for box, (lo, n) in self._overlapping(name, piece.offsets, piece.lengths):
            src = box.load()
            _narrow(out, [a - b for a, b in zip(lo, piece.offsets)], n).copy_(
                _narrow(src, [a - b for a, b in zip(lo, box.offsets)], n))
            covered += math.prod(n)
        if covered != math.prod(piece.lengths):  # saved boxes are disjoint: their intersections must fill it
            raise ConfigError(f"checkpoint {self.ckpt} lacks part of {name} (box at {piece.offsets} of size "
                              f"{piece.lengths}); it is incomplete — load an earlier iteration")

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
