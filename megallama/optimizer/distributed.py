"""``DistributedDataParallel``: our own DDP wrapper with ZeRO stages 0-3 (no torch DDP, FSDP or DeepSpeed).

Every stage keeps gradients in one contiguous buffer laid out by ``BufferLayout`` and accumulates them from
``post_accumulate_grad`` hooks (``param.grad`` is folded in and freed at once, as Megatron does):

* stage 0: full fp32 grad buffer (``param.main_grad``), all-reduced per bucket; the optimizer is not sharded.
* stage 1: full grad buffer, reduce-scattered per bucket; each rank updates its shard and all-gathers the params.
* stage 2: only this rank's gradient shard is kept: each microbatch's gradients are copied into a bucket-sized
  staging buffer as backward produces them and reduce-scattered into the shard when the bucket is complete
  (DeepSpeed's scheme, since full gradients are never kept; ``grad_shard_reducer.GradShardReducer``).
* stage 3: stage 2 plus parameters sharded per unit (``zero3.Zero3Params``); under expert parallelism a MoE
  layer's experts over the expert-data-parallel group, its dense params over dp x cp; frozen ones (LoRA) alike.

Stages 0-1 communicate only on the last microbatch (``no_sync`` marks the others); with ``overlap_grad_reduce`` the
bucket collectives start asynchronously from the hooks as soon as a bucket's gradients are complete, so they overlap
the rest of backward; ``finish_grad_sync`` launches what is left and waits. Averaging over dp happens inside the
collective on NCCL (``ReduceOp.AVG``), as a pre-scaling by 1/dp on gloo; in the grad dtype (fp32 by default).
``grad_reduce_in_fp32=False`` (``--grad-reduce-in-bf16``) is Megatron's: the buffer (and stage 2/3 staging) takes the
bf16 params' dtype, so microbatch sums and every collective are bf16, and the optimizer upcasts its shard. Not bf16
copies of an fp32 buffer per collective: this halves gradient memory and gives Megatron's numerics under its flag.

Sums over other groups (sequence-parallel norm weights over tp, the tied embedding over the embedding group) go
through ``all_reduce_param_grads(params, group)`` *after* ``finish_grad_sync``: it works at every stage, whereas
reading ``param.main_grad`` does not (stages 2-3 keep no full gradient, so with dp > 1 there is no main_grad).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu.coalesced import all_reduce_coalesced
from megallama.mpu.grad_accum_fusion import take_grad_added_to_main_grad
from megallama.optimizer.grad_shard_reducer import GradShardReducer, prepare_average
from megallama.optimizer.param_and_grad_buffer import (BufferLayout, Comm, Piece, all_gather_into_tensor, bucketize,
                                                       needs_own_bucket, reduce_scatter_tensor)


def _weak_grad_hook(ddp):
    """The gradient hook, holding the wrapper weakly. The garbage collector cannot see a tensor's hooks, so a bound
    method there keeps the wrapper, the model and its buffers alive for the life of the process: one leaked model
    per wrapper built (a notebook, the Python API, the memory benchmark's configurations one after another)."""
    ref = weakref.ref(ddp)

    def hook(p: nn.Parameter) -> None:
        wrapper = ref()
        if wrapper is not None:
            wrapper._grad_hook(p)
    return hook


def is_zero3(chunk) -> bool:
    """Whether a model chunk is a ZeRO-3 wrapper: its parameters are shards, full copies come from the wrapper."""
    return getattr(chunk, "zero_stage", 0) == 3


def split_tp_replicated(params: List[nn.Parameter]) -> List[List[nn.Parameter]]:
    """At tp > 1: the tp-sharded params, then the ones every tp rank holds whole (norm weights), never in one bucket.
    A bucket's gradient compression (top-k selection, 1-bit chunk scales) mixes all its entries, so a replicated
    weight sharing a bucket with tp-sharded ones would get a different update on each tp rank and the copies drift
    apart; alone, its bucket is the same on every tp rank and so is its compressed average."""
    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return [params]
    sharded = [p for p in params if getattr(p, "tensor_model_parallel", False)]
    return [sharded, [p for p in params if not getattr(p, "tensor_model_parallel", False)]]


def finish_param_sync(model_chunks) -> None:
    """Wait for the parameter all-gathers that --overlap-param-gather leaves in flight after a step, so that the
    parameters are final (before reading them for a checkpoint, or returning the model); plain modules pass."""
    for chunk in model_chunks:
        if hasattr(chunk, "finish_param_sync"):
            chunk.finish_param_sync()


def hook_reduces(bucket) -> bool:
    """Whether a registered comm hook (gradient compression) reduces ``bucket``: every dense bucket; MoE expert
    buckets under expert parallelism go exact over the expert-data-parallel group."""
    return not bucket.comm.expert


class DistributedDataParallel(nn.Module):
    def __init__(self, module: nn.Module, *, zero_stage: int = 0, data_parallel_group=None,
                 bucket_size: Optional[int] = 40_000_000, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False, grad_reduce_in_fp32: bool = True):
        super().__init__()
        if zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero stage {zero_stage} is not one of 0, 1, 2, 3; fix --zero-stage")
        if bucket_size is not None and bucket_size <= 0:
            raise ConfigError(f"bucket size {bucket_size} must be a positive number of elements; fix --bucket-size")
        self.module = module
        self.zero_stage = zero_stage
        self.overlap_grad_reduce, self.overlap_param_gather = overlap_grad_reduce, overlap_param_gather
        group = data_parallel_group
        if group is None:
            ps.check_initialized_for_world("wrapping the model (or pass data_parallel_group)")
            group = ps.get_data_parallel_group(with_context_parallel=True)
        self.comm = Comm.of(group)
        self.dp_size, self.dp_group, self.dp_rank = self.comm.size, self.comm.group, self.comm.rank

        params = [p for p in module.parameters() if p.requires_grad]
        # an empty pipeline stage holds no parameters at all; a stage without decoder layers under LoRA holds only
        # frozen ones (no adapters: apply_strategy checked that some stage has them)
        if not params and any(True for _ in module.parameters()) and not getattr(module, "frozen_by_lora", False):
            raise ConfigError("the model has no trainable parameters; nothing for DDP/ZeRO to do")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ConfigError(f"trainable parameters have mixed dtypes {sorted(map(str, dtypes))}; build the model "
                              "with one --params-dtype")
        self.param_dtype = params[0].dtype if params else getattr(module, "params_dtype", torch.float32)
        self.grad_dtype = torch.float32 if grad_reduce_in_fp32 else self.param_dtype
        self.device = params[0].device if params else next(iter([*module.parameters(), *module.buffers()]),
                                                            torch.empty(0)).device
        self.param_names = {p: n for n, p in module.named_parameters()}
        frozen = [p for p in module.parameters() if not p.requires_grad] if zero_stage == 3 else []
        self.shapes = {p: p.shape for p in params + frozen}

        # MoE expert params (``allreduce = False``) under expert parallelism: reduced over the expert-dp group (the
        # dp x cp ranks holding the same experts), averaged over dp x cp like the dense ones; ZeRO-3 frozen: sharded.
        expert = [p for p in params + frozen if getattr(p, "allreduce", True) is False]
        self.expert_comm = None
        if expert and ps.get_expert_model_parallel_world_size() > 1 and data_parallel_group is None:
            self.expert_comm = Comm.of(ps.get_expert_data_parallel_group(), self.dp_size, expert=True)
        else:
            expert = []
        dense = [p for p in params if p not in set(expert)]

        self.zero3 = None
        if zero_stage == 3:
            from megallama.optimizer.zero3 import build_units, unit_buckets
            units, root = build_units(module, params, frozen)
            buckets = unit_buckets(units, root, set(expert), self.comm, self.expert_comm)
        else:
            shared = lambda p: self.dp_size > 1 and needs_own_bucket(module, p)  # noqa: E731
            buckets = [(bp, self.comm) for part in split_tp_replicated(dense)
                       for bp in bucketize(list(reversed(part)), bucket_size, shared)]
            buckets += [(bp, self.expert_comm) for bp in bucketize(list(reversed(expert)), bucket_size)]
        # Stage 0 never shards, so its buckets need no dp padding.
        self.layout = BufferLayout(buckets, sharded=zero_stage >= 1)
        # Stage 2/3 keep only the gradient shard; with dp = 1 the shard is the whole buffer and the plain path runs.
        self.shard_grads = zero_stage >= 2 and self.dp_size > 1
        self.grad_reducer = GradShardReducer(self)  # stages 2/3 (stage 3 with dp = 1: only its end-of-backward)

        self.param_buffer = None
        if zero_stage in (1, 2):  # params become views of one buffer so that one all_gather per bucket updates them
            self.param_buffer = torch.zeros(self.layout.numel, dtype=self.param_dtype, device=self.device)
            with torch.no_grad():
                for p, (s, e, _) in self.layout.index.items():
                    self.param_buffer[s:e].copy_(p.data.view(-1))
                    p.data = self.param_buffer[s:e].view(self.shapes[p])
        if zero_stage == 3:
            from megallama.optimizer.zero3 import Zero3Params
            self.zero3 = Zero3Params(self, units, root, set(expert))

        n = self.layout.shard_numel if self.shard_grads else self.layout.numel
        self.grad_buffer = torch.zeros(n, dtype=self.grad_dtype, device=self.device)
        if not self.shard_grads:
            for p, (s, e, _) in self.layout.index.items():
                p.main_grad = self.grad_buffer[s:e].view(self.shapes[p])

        self.is_last_microbatch = True
        self.grad_reduce_bytes = 0  # bytes handed to the dp gradient collectives (bf16 buffers: half of fp32's)
        self._pieces = None
        self._handles: List = []  # stage 0/1 async collectives
        self._grads_dirty = False
        self.comm_hook = None  # stages 0/1: replaces the bucket collective (gradient compression)
        self._hook_stream, self._hook_pending = None, False  # CUDA + overlap_grad_reduce: see hook_stream_context
        self._param_gather_handles = {}  # stage 1/2 with overlap_param_gather: bucket index -> handle
        hook = _weak_grad_hook(self)
        self._hook_handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
        if overlap_param_gather and zero_stage in (1, 2) and self.dp_size > 1:
            self._register_param_gather_waits(module)

    def _register_param_gather_waits(self, module: nn.Module) -> None:
        """Each unit (decoder layer, embedding, norm: as in stage 3) waits for the buckets of its params just
        before its forward. Not leaf modules: the model may read a leaf's weight without calling it (fused QKV).
        The root (output layer weight) waits after ``module.model`` (and before a tied embedding runs)."""
        from megallama.optimizer.zero3 import build_units
        units, root = build_units(module, list(self.layout.index))

        def buckets(params):
            return sorted({self.layout.index[p][2] for p in params})
        for u in units:
            u.module.register_forward_pre_hook(lambda _m, _a, idx=buckets(u.params): self._wait_param_gather(idx))
        if root is None:
            return
        idx = buckets(root.params)
        anchor = getattr(module, "model", None)
        if isinstance(anchor, nn.Module):
            anchor.register_forward_hook(lambda _m, _a, _o: self._wait_param_gather(idx))
            for m in root.modules:
                m.register_forward_pre_hook(lambda _m, _a: self._wait_param_gather(idx))
        else:
            module.register_forward_pre_hook(lambda _m, _a: self._wait_param_gather(idx))

    # ------------------------------------------------------------------ forward / state
    def forward(self, *args, **kwargs):
        if self.zero3 is not None:
            return self.zero3.forward(args, kwargs)
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict (no ``module.`` prefix); stage 3 gathers full parameters (collective)."""
        self.finish_param_sync()
        if self.zero3 is not None:
            return self.zero3.full_state_dict()
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        self.finish_param_sync()
        if self.zero3 is not None:
            return self.zero3.load_full_state_dict(state_dict, strict)
        return self.module.load_state_dict(state_dict, strict=strict)

    def num_parameters(self) -> int:
        """Trainable + frozen parameter count of the full (unsharded) module."""
        return sum(self.shapes[p].numel() if p in self.shapes else p.numel() for p in self.module.parameters())

    # ------------------------------------------------------------------ gradient hooks
    @contextlib.contextmanager
    def no_sync(self):
        """Microbatches before the last: stages 0-1 only accumulate locally (stages 2-3 still reduce-scatter)."""
        old, self.is_last_microbatch = self.is_last_microbatch, False
        try:
            yield
        finally:
            self.is_last_microbatch = old

    def _grad_hook(self, p: nn.Parameter) -> None:
        if p.grad is None:
            return
        self._grads_dirty = True
        if not self.shard_grads:
            if not take_grad_added_to_main_grad(p):  # else the GEMM summed it in already (grad_accum_fusion)
                p.main_grad.add_(p.grad)
            p.grad = None
            if self.overlap_grad_reduce and self.is_last_microbatch and self.dp_size > 1:
                b = self.layout.bucket_of(p)
                b.num_ready += 1
                if b.num_ready == len(b.params) and not b.launched:
                    self._launch_allreduce(b, async_op=True)
            return
        self.grad_reducer.add_grad(p)

    def register_comm_hook(self, hook) -> None:
        """Stages 0/1: ``hook(bucket, data)`` replaces a bucket's collective (gradient compression, see
        megallama/optimizer/compression.py). ``data`` is the bucket's local gradient; the hook leaves the dp average
        in all of it (synchronously) and returns True, or returns False to let the usual collective run."""
        if self.zero_stage >= 2:
            raise ConfigError(f"a comm hook (gradient compression) needs the whole gradient, which ZeRO stage "
                              f"{self.zero_stage} never holds; use --zero-stage 0 or 1")
        self.comm_hook = hook

    def _launch_allreduce(self, b, async_op: bool) -> None:
        data = self.grad_buffer[b.offset:b.offset + b.numel]
        if self.comm_hook is not None and hook_reduces(b) and self._run_comm_hook(b, data, async_op):
            b.launched = True
            return
        op = prepare_average(data, b.comm)
        h = None
        if b.comm.group is None:
            pass
        elif self.zero_stage == 0:
            self.grad_reduce_bytes += data.numel() * data.element_size()
            h = dist.all_reduce(data, op=op, group=b.comm.group, async_op=async_op)
        else:
            lo = b.comm.rank * b.shard_size
            self.grad_reduce_bytes += data.numel() * data.element_size()
            h = reduce_scatter_tensor(data[lo:lo + b.shard_size], data, op=op, group=b.comm.group,
                                      async_op=async_op)
        b.launched = True
        if async_op and h is not None:
            self._handles.append(h)

    def _side_stream(self):
        """The comm hook's CUDA stream with ``overlap_grad_reduce`` (made on first use), else None: compressing a
        finished bucket then runs beside the rest of the backward (as the plain async all-reduce does), and the
        main stream waits for it in ``finish_grad_sync``."""
        if not (self.overlap_grad_reduce and self.device.type == "cuda"):
            return None
        if self._hook_stream is None:
            self._hook_stream = torch.cuda.Stream(device=self.device)
        return self._hook_stream

    def hook_stream_context(self):
        """Where the comm hook's kernels run: allocate hook state under it too (it is freed there)."""
        s = self._side_stream()
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()

    def _run_comm_hook(self, b, data: torch.Tensor, async_op: bool) -> bool:
        s = self._side_stream() if async_op else None
        if s is None:
            return self.comm_hook(b, data)
        s.wait_stream(torch.cuda.current_stream(self.device))  # after the kernels that wrote the bucket's gradients
        with torch.cuda.stream(s):
            done = self.comm_hook(b, data)
        self._hook_pending |= bool(done)
        return done

    def finish_grad_sync(self) -> None:
        """After the last microbatch's backward: launch the reductions not yet started and wait for all of them.
        Afterwards stage 0 holds averaged full grads, stages 1-3 this rank's averaged shard."""
        if self.dp_size == 1:
            return
        if self.shard_grads:
            self.grad_reducer.drain()
            return
        for b in self.layout.buckets:
            if not b.launched:
                self._launch_allreduce(b, async_op=self.overlap_grad_reduce)
        for h in self._handles:
            h.wait()
        self._handles = []
        if self._hook_pending:  # the side-stream comm hooks wrote the averaged buckets
            torch.cuda.current_stream(self.device).wait_stream(self._hook_stream)
            self._hook_pending = False
        for b in self.layout.buckets:
            b.launched, b.num_ready = False, 0

    def zero_grad_buffer(self) -> None:
        """Zero the gradient buffer before the first microbatch of an iteration (a no-op when already zero)."""
        if self._grads_dirty:
            self.grad_buffer.zero_()
            self._grads_dirty = False
        self.grad_reducer.reset()
        for b in self.layout.buckets:
            b.launched, b.num_ready = False, 0

    # ------------------------------------------------------------------ views for the optimizer
    def optimizer_pieces(self) -> List[Piece]:
        """This rank's pieces (whole parameters at stage 0) with ``model_view`` (flat, in the live parameter
        storage the optimizer updates) and ``grad_view`` (flat, the dp-averaged gradient after finish_grad_sync)."""
        if self._pieces is not None:
            return self._pieces
        pieces = self._pieces = self.layout.pieces()
        for pc in pieces:
            p, n = pc.param, pc.numel
            if self.zero_stage == 0:
                pc.model_view = p.data.view(-1)
            elif self.zero_stage in (1, 2):
                pc.model_view = self.param_buffer[pc.buf_start:pc.buf_start + n]
            else:
                pc.model_view = self.zero3.shard[pc.shard_start:pc.shard_start + n]
            g0 = pc.shard_start if self.shard_grads else pc.buf_start
            pc.grad_view = self.grad_buffer[g0:g0 + n]
            pc.name = self.param_names[p]
            pc.shape = self.shapes[p]
        return pieces

    def start_param_sync(self) -> None:
        """Stages 1-2, after the optimizer updated this rank's shard: all-gather the params of every bucket (async
        with ``overlap_param_gather``: the forward pre-hooks wait for the buckets they need)."""
        if self.zero_stage not in (1, 2) or self.dp_size == 1:
            return
        self.finish_param_sync()
        for b in reversed(self.layout.buckets):  # forward order: first needed, first sent
            if b.comm.group is None:
                continue
            lo, hi = b.own_range()
            h = all_gather_into_tensor(self.param_buffer[b.offset:b.offset + b.numel], self.param_buffer[lo:hi],
                                       group=b.comm.group, async_op=self.overlap_param_gather)
            if self.overlap_param_gather:
                self._param_gather_handles[b.index] = h

    def _wait_param_gather(self, idx) -> None:
        for i in idx:
            h = self._param_gather_handles.pop(i, None)
            if h is not None:
                h.wait()

    def finish_param_sync(self) -> None:
        self._wait_param_gather(list(self._param_gather_handles))

    def all_reduce_param_grads(self, params: Iterable[nn.Parameter], group) -> None:
        """Sum the (already dp-reduced) gradients of ``params`` over ``group``, whatever the stage: the tied
        embedding over the embedding group, sequence-parallel norm weights over tp. Call after finish_grad_sync.
        Every rank of ``group`` must hold these params at the same in-bucket position (true for tp peers, and for
        the tied pair, which gets a bucket of its own)."""
        if group is None or dist.get_world_size(group) == 1:
            return
        wanted = set(params)
        all_reduce_coalesced([pc.grad_view for pc in self.optimizer_pieces() if pc.param in wanted], group)

    # ------------------------------------------------------------------ accounting
    def memory_footprint(self) -> dict:
        """Bytes held persistently by this rank for the model: parameter storage and gradient buffer."""
        if self.zero3 is not None:  # trainable and frozen shards
            params = sum(f.shard.untyped_storage().nbytes() for f in self.zero3.flats)
        elif self.param_buffer is not None:
            params = self.param_buffer.untyped_storage().nbytes()
        else:
            params = sum(p.untyped_storage().nbytes() for p in self.layout.index)
        return {"params": params, "grads": self.grad_buffer.untyped_storage().nbytes(),
                "padding_elements": self.layout.numel - self.layout.numel_unpadded}
