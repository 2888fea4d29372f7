"""ZeRO stage 3: parameters sharded over dp, all-gathered one unit at a time just before use and freed after.

A *unit* is a decoder layer, the embedding, the final norm or the output head; parameters used outside their own
module (the tied embedding on a single stage, the ``output_weight`` copy on a last pipeline stage) form the *root*
unit, gathered for the whole forward. Each unit is one bucket of the DDP layout (two under expert parallelism: a
MoE layer's expert params are sharded over the expert-data-parallel group, its dense params over dp x cp, so each
kind is gathered and reduce-scattered over its own group, into one unit-sized tensor), so its shard is a slice of
the persistent ``shard`` buffer (this is also where the optimizer writes, in place for fp32 params). Frozen params
(a LoRA base) are sharded the same way in a second flat buffer of their own, gathered and freed with the unit's
trainable buckets, never reduced (``zero3_flat.py``).

* forward: a pre-hook waits for the unit's all-gather and starts the next unit's (prefetch, async); a post-hook
  frees the unit and wraps its outputs in ``_PreBackward``, whose backward re-gathers the unit (and prefetches the
  one before it) just before the unit's backward runs.
* backward: once every parameter of the unit has its gradient (DDP's hooks reduce-scatter the unit's bucket), the
  unit is freed; anything left is freed at the end of backward. A unit holding frozen params also waits for the
  gradient of its inputs (``_PostBackward``, applied by the pre-hook): a frozen GEMM or norm still needs its weight
  after the last adapter's gradient arrived (backward runs the adapter branch first).
* saved tensors: autograd saves views of the gathered weights (e.g. ``weight.t()`` for a matmul), which would keep
  every unit's full storage alive until backward. A ``saved_tensors_hooks`` pair replaces such a view by
  (unit, offset, size, stride) and rebuilds it from the re-gathered unit when backward needs it.
Recomputation (activation checkpointing) runs unit forwards inside backward: then nothing is freed or prefetched.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from megallama.optimizer.param_and_grad_buffer import all_gather_into_tensor
from megallama.optimizer.zero3_flat import Flat, Part, frozen_flat, full_state_dict, load_full_state_dict

_TOKEN = object()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Unit:
    def __init__(self, index: int, name: str, module: Optional[nn.Module], params: List[nn.Parameter],
                 frozen: List[nn.Parameter] = ()):
        self.index, self.name, self.module, self.params, self.frozen = index, name, module, params, list(frozen)
        self.parts: List[Part] = []  # trainable, then frozen (``zero3_flat``)
        self.buckets = []  # the trainable part's (DDP's layout): dense, then (expert parallelism) expert
        self.handles = []  # async all-gathers in flight
        self.reduced = set()  # buckets reduce-scattered in this backward
        self.awaits_inputs = False  # frozen params: released once its inputs' gradient is computed ...
        self.inputs_done = False  # ... which happened in this backward

    @property
    def full(self) -> Optional[torch.Tensor]:
        """The first part's gathered storage (None while freed)."""
        return self.parts[0].full if self.parts else None

    def __repr__(self):
        return f"Unit({self.name}, {sum(p.numel() for p in self.params)} params, {len(self.frozen)} frozen)"


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


def build_units(module: nn.Module, params: List[nn.Parameter],
                frozen: List[nn.Parameter] = ()) -> Tuple[List[Unit], Optional[Unit]]:
    """Units in forward order plus the root unit (None when empty). Llama: embedding, layers, norm, head (the
    head's weight is read by ``compute_logits``, so it is root); any other module: the children of every
    ModuleList/ModuleDict, the rest in the root. ``frozen`` params join their units as ``Unit.frozen``."""
    trainable, fro = set(params), set(frozen)
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
    units, taken, root_params, root_frozen, root_modules = [], set(), [], [], []
    for name, m in named:
        ps_ = [p for p in m.parameters() if p in trainable and p not in taken]
        fs = [p for p in m.parameters() if p in fro and p not in taken]
        taken.update(ps_ + fs)
        if any(p in shared for p in ps_ + fs):  # also used outside its own module: it joins the root
            root_params += ps_
            root_frozen += fs
            root_modules.append(m)
        elif ps_ or fs:
            units.append(Unit(len(units), name, m, ps_, fs))
    root_params += [p for p in params if p not in taken]
    root_frozen += [p for p in frozen if p not in taken]
    root = Unit(-1, "root", None, root_params, root_frozen) if root_params or root_frozen else None
    if root is not None:
        root.modules = root_modules
    return units, root


def unit_buckets(units: List[Unit], root: Optional[Unit], expert: set, dense_comm, expert_comm,
                 kind: str = "params") -> list:
    """The layout's (params, comm) buckets, root first then the units in backward order: a unit's dense params
    over dp (x cp), then its expert params (``expert``) over the expert-dp group in a bucket right after.
    ``kind``: the units' trainable ``params`` (DDP's layout) or their ``frozen`` ones (the frozen layout)."""
    out = []
    for u in ([root] if root is not None else []) + list(reversed(units)):
        out.append(([p for p in getattr(u, kind) if p not in expert], dense_comm))
        out.append(([p for p in getattr(u, kind) if p in expert], expert_comm))
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


class _PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs whose backward runs once the unit's backward is done: frees a unit with frozen
    params (their GEMMs and norms need the weights until then; no gradient of theirs says so)."""

    @staticmethod
    def forward(ctx, manager, unit, *xs):
        ctx.manager, ctx.unit = manager, unit
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.manager.post_backward(ctx.unit)
        return (None, None, *grads)


def _map_tensors(out, fn):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


class Zero3Params:
    """Owns the parameter shards of one DDP-wrapped module (trainable and frozen) and the gather/free schedule."""

    def __init__(self, ddp, units: List[Unit], root: Optional[Unit], expert: set = frozenset()):
        self.ddp, self.units, self.root = ddp, units, root
        self.layout, self.dp, self.rank, self.group = ddp.layout, ddp.dp_size, ddp.dp_rank, ddp.dp_group
        self.all_units = ([root] if root is not None else []) + list(units)
        dtype, device = ddp.param_dtype, ddp.device
        self.flat = Flat(self.layout, ddp.shapes, dtype, device)
        self.shard = self.flat.shard  # the optimizer's (trainable) shard
        self.frozen = frozen_flat(units, root, expert, ddp.comm, ddp.expert_comm, device)
        self.flats = [self.flat] + ([self.frozen] if self.frozen is not None else [])
        self._dtypes = {f.shard.dtype for f in self.flats}
        self.bucket_unit = {}
        for u in self.all_units:
            u.parts = [Part(u, f, ps_) for f, ps_ in ((self.flat, u.params), (self.frozen, u.frozen)) if ps_]
            u.buckets = u.parts[0].buckets if u.params else []
            self.bucket_unit.update((b.index, u) for b in u.buckets)
        self._by_ptr = {}
        if self.dp == 1:  # nothing to shard: params are permanent views of the (full) shard buffers
            for u in self.all_units:
                for part in u.parts:
                    part.point_params(part.flat.shard, 0)
            return
        for f in self.flats:  # drop the full original storage
            for p in f.layout.index:
                p.data = f.empty
        for u in units:
            u.module.register_forward_pre_hook(lambda m, a, u=u: self._pre_forward(u, a))
            u.module.register_forward_hook(lambda m, a, out, u=u: self._post_forward(u, out))
        # Llama: the root (output layer weight) is needed only after ``module.model`` ran (and, when tied on one
        # stage, by the embedding): gather it there, prefetched while the last unit runs. Otherwise: whole forward.
        anchor = getattr(ddp.module, "model", None)
        self.anchor = anchor if root is not None and isinstance(anchor, nn.Module) else None
        self.root_at_end = self.anchor is not None and getattr(ddp.module, "post_process", True)
        if self.anchor is not None:
            if self.root_at_end:
                self.anchor.register_forward_hook(lambda m, a, out: self._root_at_end(out))
            for m in root.modules:
                m.register_forward_pre_hook(lambda m, a: self.gather(root))
                m.register_forward_hook(lambda m, a, out: self._post_forward(root, out))

    # ---------------------------------------------------------------- gather / free
    def gather_part(self, part: Part, async_op: bool = False) -> None:
        if self.dp == 1:
            return
        u = part.unit
        if part.full is None:
            shard = part.flat.shard
            full = torch.empty(part.numel, dtype=shard.dtype, device=shard.device)
            for b in part.buckets:  # each over its own group (expert buckets: expert-dp, maybe of one rank)
                out = full[b.offset - part.offset:b.offset - part.offset + b.numel]
                mine = shard[b.shard_offset:b.shard_offset + b.shard_size]
                if b.comm.group is None:
                    out.copy_(mine)
                    continue
                h = all_gather_into_tensor(out, mine, group=b.comm.group, async_op=async_op)
                if h is not None:
                    u.handles.append(h)
            part.full = full
            self._by_ptr[full.untyped_storage().data_ptr()] = part
            part.point_params(full, part.offset)
        if not async_op:
            self._wait(u)

    def gather(self, u: Unit, async_op: bool = False) -> None:
        for part in u.parts:
            self.gather_part(part, async_op)

    @staticmethod
    def _wait(u: Unit) -> None:
        for h in u.handles:
            h.wait()
        u.handles = []

    def release_part(self, part: Part) -> None:
        if self.dp == 1 or part.full is None:
            return
        self._wait(part.unit)
        self._by_ptr.pop(part.full.untyped_storage().data_ptr(), None)
        for p in part.params:
            p.data = part.flat.empty
        part.full = None

    def release(self, u: Unit) -> None:
        u.reduced.clear()
        u.inputs_done = False
        for part in u.parts:
            self.release_part(part)

    def release_all(self) -> None:
        for u in self.all_units:
            self.release(u)

    def _release_if_done(self, u: Unit) -> None:
        if len(u.reduced) == len(u.buckets) and (u.inputs_done or not u.awaits_inputs):
            self.release(u)

    def on_bucket_reduced(self, bucket) -> None:
        """All grads of the unit (all its buckets) were reduce-scattered in this backward: its trainable weights are
        no longer needed (nor its frozen ones once its inputs' gradient is done)."""
        u = self.bucket_unit.get(bucket.index)
        if u is not None:
            u.reduced.add(bucket.index)
            self._release_if_done(u)

    def post_backward(self, u: Unit) -> None:
        u.inputs_done = True
        self._release_if_done(u)

    # ---------------------------------------------------------------- hooks
    def _prefetch(self, i: int) -> None:
        if 0 <= i < len(self.units):
            self.gather(self.units[i], async_op=True)
        elif i == len(self.units) and self.root_at_end:
            self.gather(self.root, async_op=True)

    def _await_inputs(self, u: Unit, xs):
        """Wrap the tensors of ``xs`` that need a gradient in ``_PostBackward(u)`` (units with frozen params)."""
        idx = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.requires_grad]
        u.awaits_inputs = bool(u.frozen) and torch.is_grad_enabled() and bool(idx)
        if not u.awaits_inputs:
            return None
        xs = list(xs)
        for i, y in zip(idx, _PostBackward.apply(self, u, *[xs[i] for i in idx])):
            xs[i] = y
        return xs

    def _pre_forward(self, u: Unit, args):
        self.gather(u)
        if _in_backward():
            return None
        self._prefetch(u.index + 1)
        out = self._await_inputs(u, args)
        return tuple(out) if out is not None else None

    def _root_at_end(self, out):
        self.gather(self.root)
        if isinstance(out, torch.Tensor):
            wrapped = self._await_inputs(self.root, [out])
            return wrapped[0] if wrapped is not None else None
        return None

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
        if t.dtype not in self._dtypes or not self._by_ptr:
            return t
        try:
            part = self._by_ptr.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return t
        if part is None:
            return t
        return (_TOKEN, part, t.storage_offset(), tuple(t.size()), tuple(t.stride()))

    def _unpack(self, x):
        if isinstance(x, tuple) and len(x) == 5 and x[0] is _TOKEN:
            _, part, off, size, stride = x
            self.gather(part.unit)
            return part.full.as_strided(size, stride, off)
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
    def full_state_dict(self, keep=None) -> dict:
        """Full parameters (``keep``: only those it accepts), unit by unit (collective over dp), plus buffers."""
        return full_state_dict(self, keep)

    def load_full_state_dict(self, state_dict: dict, strict: bool = True):
        return load_full_state_dict(self, state_dict, strict)
