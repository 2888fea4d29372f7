"""ZeRO-3's flat parameter storage: the trainable layout (DDP's, whose shard the optimizer updates) and the frozen one.

Frozen parameters (a LoRA base) are sharded like the trainable ones, FSDP-style, so that each rank stores 1/(dp x cp)
of them: a second ``BufferLayout`` with a bucket per unit (dense params over dp x cp, MoE experts over the
expert-data-parallel group), in the frozen params' own dtype, that is all-gathered with the unit's trainable buckets
and never reduced. A ``Part`` is one unit's params of one layout: its buckets, their range and, while the unit is
gathered, the full storage its parameters view. The full state dict (checkpoints) is assembled here, part by part.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megallama.errors import ConfigError
from megallama.optimizer.param_and_grad_buffer import BufferLayout


class Flat:
    """One layout and this rank's persistent shard of it (a copy of the params' current values)."""

    def __init__(self, layout: BufferLayout, shapes: dict, dtype, device):
        self.layout, self.shapes = layout, shapes
        self.shard = torch.zeros(layout.shard_numel, dtype=dtype, device=device)
        self.empty = torch.empty(0, dtype=dtype, device=device)
        with torch.no_grad():
            for pc in layout.pieces():
                flat = pc.param.data.view(-1)[pc.param_start:pc.param_end]
                self.shard[pc.shard_start:pc.shard_start + pc.numel].copy_(flat)


class Part:
    """A unit's parameters of one ``Flat``: their buckets (adjacent in the layout) and gathered storage."""

    def __init__(self, unit, flat: Flat, params):
        self.unit, self.flat, self.params = unit, flat, params
        by_index = {flat.layout.bucket_of(p).index: flat.layout.bucket_of(p) for p in params}
        self.buckets = [by_index[i] for i in sorted(by_index)]
        self.offset = self.buckets[0].offset
        self.numel = self.buckets[-1].offset + self.buckets[-1].numel - self.offset
        self.full: Optional[torch.Tensor] = None  # while gathered

    def point_params(self, full: torch.Tensor, base: int) -> None:
        for p in self.params:
            s, e, _ = self.flat.layout.index[p]
            p.data = full[s - base:e - base].view(self.flat.shapes[p])


def frozen_flat(units, root, expert: set, dense_comm, expert_comm, device) -> Optional[Flat]:
    """The frozen params' ``Flat`` (None when there are none), buckets as ``zero3.unit_buckets`` lays out."""
    from megallama.optimizer.zero3 import unit_buckets
    frozen = [p for u in ([root] if root is not None else []) + list(units) for p in u.frozen]
    if not frozen:
        return None
    dtypes = {p.dtype for p in frozen}
    if len(dtypes) > 1:
        raise ConfigError(f"frozen parameters have mixed dtypes {sorted(map(str, dtypes))}; ZeRO-3 shards them in "
                          "one buffer: build the model with one --params-dtype")
    layout = BufferLayout(unit_buckets(units, root, expert, dense_comm, expert_comm, kind="frozen"), sharded=True)
    return Flat(layout, {p: p.shape for p in frozen}, frozen[0].dtype, device)


def full_state_dict(z, keep: Optional[Callable] = None) -> dict:
    """Full parameters, part by part (collective over dp), plus the module's buffers; with ``keep``, only the
    parameters it accepts (e.g. the LoRA adapters, without gathering the frozen base)."""
    names = z.ddp.param_names
    out = {}
    for u in z.all_units:
        for part in u.parts:
            params = [p for p in part.params if keep is None or keep(p)]
            if not params:
                continue
            was_live = part.full is not None
            z.gather_part(part)
            for p in params:
                out[names[p]] = p.detach().clone()
            if not was_live:
                z.release_part(part)
    if keep is not None:
        return out
    sd = z.ddp.module.state_dict(keep_vars=True)
    return {k: out[k] if k in out else v.detach() for k, v in sd.items()}


def load_full_state_dict(z, state_dict: dict, strict: bool = True):
    """Copy this rank's shard of full tensors into both flats; buffers through the module."""
    names = z.ddp.param_names
    expected = set(z.ddp.module.state_dict(keep_vars=True).keys())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if strict and (missing or unexpected):
        raise ConfigError(f"model state dict does not match: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                          "load a checkpoint of the same model and parallel layout (tp/pp)")
    with torch.no_grad():
        for flat in z.flats:
            for pc in flat.layout.pieces():
                name = names[pc.param]
                if name not in state_dict:
                    continue
                src = state_dict[name]
                if tuple(src.shape) != tuple(flat.shapes[pc.param]):
                    raise ConfigError(f"parameter {name} has shape {tuple(src.shape)} in the checkpoint but "
                                      f"{tuple(flat.shapes[pc.param])} here; the tp layout differs")
                piece = src.reshape(-1)[pc.param_start:pc.param_end]
                flat.shard[pc.shard_start:pc.shard_start + pc.numel].copy_(piece)
        live = [part for u in z.all_units for part in u.parts if part.full is not None]
        for part in live:
            z.release_part(part)
            z.gather_part(part)
    params = set(names.values())
    rest = {k: v for k, v in state_dict.items() if k not in params}
    z.ddp.module.load_state_dict(rest, strict=False)
    return None
