"""ZeRO stage 3: parameters sharded over dp, all-gathered one unit at a time just before use and freed after.

A *unit* is a decoder layer, the embedding, the final norm or the output head; parameters used outside their own
module (the tied embedding on a single stage, the ``output_weight`` copy on a last pipeline stage) form the *root*
unit, gathered for the whole forward. Each unit is one bucket of the DDP layout (two under expert parallelism: a
MoE layer's expert params are sharded over the expert-data-parallel group, its dense params over dp x cp, so each
kind is gathered and reduce-scattered over its own group, into one unit-sized tensor), so its shard is a slice of
the persistent ``shard`` buffer (this is also where the optimizer writes, in place for fp32 params).

* forward: a pre-hook waits for the unit's all-gather and starts the next unit's (prefetch, async); a post-hook
  frees the unit and wraps its outputs in ``_PreBackward``, whose backward re-gathers the unit (and prefetches the
  one before it) just before the unit's backward runs.
* backward: once every parameter of the unit has its gradient (DDP's hooks reduce-scatter the unit's bucket), the
  unit is freed; anything left is freed at the end of backward.
* saved tensors: autograd saves views of the gathered weights (e.g. ``weight.t()`` for a matmul), which would keep
  every unit's full storage alive until backward. A ``saved_tensors_hooks`` pair replaces such a view by
  (unit, offset, size, stride) and rebuilds it from the re-gathered unit when backward needs it.
Recomputation (activation checkpointing) runs unit forwards inside backward: then nothing is freed or prefetched.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from megallama.errors import ConfigError
from megallama.optimizer.param_and_grad_buffer import all_gather_into_tensor

_TOKEN = object()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Unit:
    def __init__(self, index: int, name: str, module: Optional[nn.Module], params: List[nn.Parameter]):
        self.index, self.name, self.module, self.params = index, name, module, params
        self.buckets = []  # adjacent in the layout: dense, then (expert parallelism) expert
        self.offset = self.numel = 0  # the buckets' range in the flat layout
        self.full: Optional[torch.Tensor] = None  # the gathered buckets while live
        self.handles = []  # async all-gathers in flight
        self.reduced = set()  # buckets reduce-scattered in this backward

    def __repr__(self):
        return f"Unit({self.name}, {sum(p.numel() for p in self.params)} params)"


def params_used_outside_their_module(module: nn.Module) -> set:
    """Parameters read by code outside their owning module's forward (Llama's ``compute_logits`` uses the output
    layer weight directly): per-module hooks cannot see those uses."""
    out = set()
    if hasattr(module, "output_layer_weight"):
        try:
            out.add(module.output_layer_weight())
        except (AttributeError, RuntimeError):
            pass
    return out


def build_units(module: nn.Module, params: List[nn.Parameter]) -> Tuple[List[Unit], Optional[Unit]]:
    """Units in forward order plus the root unit (None when empty). Llama: embedding, layers, norm, head (the
    head's weight is read by ``compute_logits``, so it is root); any other module: the children of every
    ModuleList/ModuleDict, the rest in the root."""
    trainable = set(params)
    inner = getattr(module, "model", None)
    named: List[Tuple[str, nn.Module]] = []
    if inner is not None and hasattr(inner, "layers"):
        if getattr(inner, "embed_tokens", None) is not None:
            named.append(("model.embed_tokens", inner.embed_tokens))
        named += [(f"model.layers.{k}", layer) for k, layer in inner.layers.items()]
        if getattr(inner, "norm", None) is not None:
            named.append(("model.norm", inner.norm))
        if getattr(module, "lm_head", None) is not None:
            named.append(("lm_head", module.lm_head))
    else:
        for name, m in module.named_modules():
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                named += [(f"{name}.{k}" if name else k, c) for k, c in m.named_children()]
    shared = params_used_outside_their_module(module)
    units, taken, root_params, root_modules = [], set(), [], []
    for name, m in named:
        ps_ = [p for p in m.parameters() if p in trainable and p not in taken]
        taken.update(ps_)
        if any(p in shared for p in ps_):  # also used outside its own module: it joins the root
            root_params += ps_
            root_modules.append(m)
        elif ps_:
            units.append(Unit(len(units), name, m, ps_))
    root_params += [p for p in params if p not in taken]
    root = Unit(-1, "root", None, root_params) if root_params else None
    if root is not None:
        root.modules = root_modules
    return units, root


def unit_buckets(units: List[Unit], root: Optional[Unit], expert: set, dense_comm, expert_comm) -> list:
    """The layout's (params, comm) buckets, root first then the units in backward order: a unit's dense params
    over dp (x cp), then its expert params (``expert``) over the expert-dp group in a bucket right after."""
    out = []
    for u in ([root] if root is not None else []) + list(reversed(units)):
        out.append(([p for p in u.params if p not in expert], dense_comm))
        out.append(([p for p in u.params if p in expert], expert_comm))
    return out


class _PreBackward(torch.autograd.Function):
    """Identity whose backward gathers ``unit`` before the unit's own backward needs its weights."""

    @staticmethod
    def forward(ctx, manager, unit, x):
        ctx.manager, ctx.unit = manager, unit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.manager.pre_backward(ctx.unit)
        return None, None, grad


def _map_tensors(out, fn):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


class Zero3Params:
    """Owns the parameter shard of one DDP-wrapped module and the gather/free schedule."""

    def __init__(self, ddp, units: List[Unit], root: Optional[Unit]):
        self.ddp, self.units, self.root = ddp, units, root
        self.layout, self.dp, self.rank, self.group = ddp.layout, ddp.dp_size, ddp.dp_rank, ddp.dp_group
        self.all_units = ([root] if root is not None else []) + list(units)
        self.bucket_unit = {}
        for u in self.all_units:
            u.buckets = sorted({self.layout.bucket_of(p).index: self.layout.bucket_of(p) for p in u.params}.values(),
                               key=lambda b: b.index)
            u.offset = u.buckets[0].offset
            u.numel = u.buckets[-1].offset + u.buckets[-1].numel - u.offset
            self.bucket_unit.update((b.index, u) for b in u.buckets)
        dtype, device = ddp.param_dtype, ddp.device
        self.shard = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)
        self._empty = torch.empty(0, dtype=dtype, device=device)
        self._by_ptr = {}
        with torch.no_grad():
            for pc in self.layout.pieces():
                flat = pc.param.data.view(-1)[pc.param_start:pc.param_end]
                self.shard[pc.shard_start:pc.shard_start + pc.numel].copy_(flat)
        if self.dp == 1:  # nothing to shard: params are permanent views of the (full) shard buffer
            for u in self.all_units:
                self._point_params(u, self.shard, 0)
            return
        for p in ddp.layout.index:  # drop the full original storage
            p.data = self._empty
        for u in units:
            u.module.register_forward_pre_hook(lambda m, a, u=u: self._pre_forward(u))
            u.module.register_forward_hook(lambda m, a, out, u=u: self._post_forward(u, out))
        # Llama: the root (output layer weight) is needed only after ``module.model`` ran (and, when tied on one
        # stage, by the embedding): gather it there, prefetched while the last unit runs. Otherwise: whole forward.
        anchor = getattr(ddp.module, "model", None)
        self.anchor = anchor if root is not None and isinstance(anchor, nn.Module) else None
        self.root_at_end = self.anchor is not None and getattr(ddp.module, "post_process", True)
        if self.anchor is not None:
            if self.root_at_end:
                self.anchor.register_forward_hook(lambda m, a, out: self.gather(root))
            for m in root.modules:
                m.register_forward_pre_hook(lambda m, a: self.gather(root))
                m.register_forward_hook(lambda m, a, out: self._post_forward(root, out))

    # ---------------------------------------------------------------- gather / free
    def _point_params(self, u: Unit, full: torch.Tensor, base: int) -> None:
        for p in u.params:
            s, e, _ = self.layout.index[p]
            p.data = full[s - base:e - base].view(self.ddp.shapes[p])

    def gather(self, u: Unit, async_op: bool = False) -> None:
        if self.dp == 1:
            return
        if u.full is None:
            full = torch.empty(u.numel, dtype=self.shard.dtype, device=self.shard.device)
            for b in u.buckets:  # each over its own group (expert buckets: expert-dp, maybe of one rank)
                out = full[b.offset - u.offset:b.offset - u.offset + b.numel]
                mine = self.shard[b.shard_offset:b.shard_offset + b.shard_size]
                if b.comm.group is None:
                    out.copy_(mine)
                    continue
                h = all_gather_into_tensor(out, mine, group=b.comm.group, async_op=async_op)
                if h is not None:
                    u.handles.append(h)
            u.full = full
            self._by_ptr[full.untyped_storage().data_ptr()] = u
            self._point_params(u, full, u.offset)
        if not async_op:
            self._wait(u)

    @staticmethod
    def _wait(u: Unit) -> None:
        for h in u.handles:
            h.wait()
        u.handles = []

    def release(self, u: Unit) -> None:
        u.reduced.clear()
        if self.dp == 1 or u.full is None:
            return
        self._wait(u)
        self._by_ptr.pop(u.full.untyped_storage().data_ptr(), None)
        for p in u.params:
            p.data = self._empty
        u.full = None

    def release_all(self) -> None:
        for u in self.all_units:
            self.release(u)

    def on_bucket_reduced(self, bucket) -> None:
        """All grads of the unit (all its buckets) were reduce-scattered in this backward: its weights are no longer
        needed."""
        u = self.bucket_unit.get(bucket.index)
        if u is not None:
            u.reduced.add(bucket.index)
            if len(u.reduced) == len(u.buckets):
                self.release(u)

    # ---------------------------------------------------------------- hooks
    def _prefetch(self, i: int) -> None:
        if 0 <= i < len(self.units):
            self.gather(self.units[i], async_op=True)
        elif i == len(self.units) and self.root_at_end:
            self.gather(self.root, async_op=True)

    def _pre_forward(self, u: Unit) -> None:
        self.gather(u)
        if not _in_backward():
            self._prefetch(u.index + 1)

    def _post_forward(self, u: Unit, out):
        if _in_backward():  # recomputation: backward is about to use the weights
            return out
        if torch.is_grad_enabled():
            out = _map_tensors(out, lambda t: _PreBackward.apply(self, u, t) if t.requires_grad else t)
        self.release(u)
        return out

    def pre_backward(self, u: Unit) -> None:
        self.ddp.grad_reducer.queue_end_of_backward()
        self.gather(u)
        self._prefetch(len(self.units) - 1 if u is self.root else u.index - 1)

    def _pack(self, t: torch.Tensor):
        if t.dtype != self.shard.dtype or not self._by_ptr:
            return t
        try:
            u = self._by_ptr.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return t
        if u is None:
            return t
        return (_TOKEN, u, t.storage_offset(), tuple(t.size()), tuple(t.stride()))

    def _unpack(self, x):
        if isinstance(x, tuple) and len(x) == 5 and x[0] is _TOKEN:
            _, u, off, size, stride = x
            self.gather(u)
            return u.full.as_strided(size, stride, off)
        return x

    def forward(self, args, kwargs):
        if self.dp == 1:
            return self.ddp.module(*args, **kwargs)
        self._prefetch(0)
        if self.root is not None and self.anchor is None:
            self.gather(self.root)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = self.ddp.module(*args, **kwargs)
        grad = torch.is_grad_enabled()
        if self.root is not None and grad and (self.anchor is None or self.root_at_end):
            out = _map_tensors(out, lambda t: _PreBackward.apply(self, self.root, t) if t.requires_grad else t)
        for u in self.units:  # prefetched but not run
            self.release(u)
        if not grad and self.root is not None:
            self.release(self.root)
        return out

    # ---------------------------------------------------------------- full state (checkpoints)
    def full_state_dict(self) -> dict:
        """Full parameters, unit by unit (collective over dp), plus the module's buffers."""
        names = self.ddp.param_names
        out = {}
        for u in self.all_units:
            was_live = u.full is not None
            self.gather(u)
            for p in u.params:
                out[names[p]] = p.detach().clone()
            if not was_live:
                self.release(u)
        sd = self.ddp.module.state_dict(keep_vars=True)
        return {k: out[k] if k in out else v.detach() for k, v in sd.items()}

    def load_full_state_dict(self, state_dict: dict, strict: bool = True):
        names = self.ddp.param_names
        expected = set(self.ddp.module.state_dict(keep_vars=True).keys())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise ConfigError(f"model state dict does not match: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                              "load a checkpoint of the same model and parallel layout (tp/pp)")
        with torch.no_grad():
            for pc in self.layout.pieces():
                name = names[pc.param]
                if name not in state_dict:
                    continue
                src = state_dict[name]
                if tuple(src.shape) != tuple(self.ddp.shapes[pc.param]):
                    raise ConfigError(f"parameter {name} has shape {tuple(src.shape)} in the checkpoint but "
                                      f"{tuple(self.ddp.shapes[pc.param])} here; the tp layout differs")
                flat = src.reshape(-1)[pc.param_start:pc.param_end]
                self.shard[pc.shard_start:pc.shard_start + pc.numel].copy_(flat)
            live = [u for u in self.all_units if u.full is not None]
            for u in live:
                self.release(u)
                self.gather(u)
        params = set(names.values())
        rest = {k: v for k, v in state_dict.items() if k not in params}
        self.ddp.module.load_state_dict(rest, strict=False)
        return None
