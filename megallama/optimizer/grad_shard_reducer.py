"""ZeRO stages 2-3: the gradient reduction that keeps only this rank's shard (DeepSpeed's scheme).

Full gradients are never kept: each microbatch's gradients are copied into a bucket-sized staging buffer as
backward produces them, and a bucket is reduce-scattered into the persistent shard (``ddp.grad_buffer``) as soon as
all of its parameters have their gradient. With ``overlap_grad_reduce`` the reduce-scatters run asynchronously, at
most ``MAX_PENDING_REDUCTIONS`` staging buffers in flight. An autograd end-of-backward callback reduces buckets
some of whose params got no gradient (their range is zero), drains, and (stage 3) frees the gathered units.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from megallama.optimizer.param_and_grad_buffer import Comm, reduce_scatter_tensor

MAX_PENDING_REDUCTIONS = 2  # staging buffers in flight before the oldest is waited for


def prepare_average(data: torch.Tensor, comm: Comm):
    """The reduce op for ``comm``; pre-scales ``data`` when the collective cannot average (gloo, expert groups)."""
    if comm.avg_in_collective:
        return dist.ReduceOp.AVG
    if comm.average_over > 1:
        data.mul_(1.0 / comm.average_over)
    return dist.ReduceOp.SUM


class GradShardReducer:
    """The stage 2/3 staging buffers and reduce-scatters of one ``DistributedDataParallel``."""

    def __init__(self, ddp):
        self.ddp = ddp
        self.layout = ddp.layout
        self.pending: List = []  # (handle, bucket, staging) of reduce-scatters in flight
        self.staging: Dict[int, torch.Tensor] = {}  # bucket index -> staging buffer being filled in this backward
        self.callback_queued = False

    def add_grad(self, p) -> None:
        """From the post-accumulate-grad hook: stage ``p.grad`` (then freed); reduce its bucket once complete."""
        self.queue_end_of_backward()
        b = self.layout.bucket_of(p)
        st = self.staging.get(b.index)
        if st is None:  # not zero-filled: every param's range is written below (or zeroed at a partial flush)
            st = self.staging[b.index] = torch.empty(b.numel, dtype=self.ddp.grad_dtype, device=self.ddp.device)
            st[b.numel_unpadded:].zero_()
            b.extra["filled"] = set()
        s, e, _ = self.layout.index[p]
        st[s - b.offset:e - b.offset].copy_(p.grad.reshape(-1))
        b.extra["filled"].add(p)
        p.grad = None
        b.num_ready += 1
        if b.num_ready == len(b.params):
            self._launch_reduce_scatter(b)

    def queue_end_of_backward(self) -> None:
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """Reduce buckets some of whose params got no gradient, drain, free the gathered units (stage 3)."""
        self.callback_queued = False
        for idx in sorted(self.staging):
            self._launch_reduce_scatter(self.layout.buckets[idx])
        self.drain()
        for b in self.layout.buckets:
            b.num_ready = 0
        if self.ddp.zero3 is not None:
            self.ddp.zero3.release_all()

    def _launch_reduce_scatter(self, b) -> None:
        st = self.staging.pop(b.index)
        filled = b.extra.pop("filled", ())
        if len(filled) < len(b.params):  # partial bucket (unused params in this backward): their grads are zero
            for p in b.params:
                if p not in filled:
                    s, e, _ = self.layout.index[p]
                    st[s - b.offset:e - b.offset].zero_()
        op = prepare_average(st, b.comm)
        lo = b.comm.rank * b.shard_size
        h = None
        overlap = self.ddp.overlap_grad_reduce
        if b.comm.group is not None:
            self.ddp.grad_reduce_bytes += st.numel() * st.element_size()
            h = reduce_scatter_tensor(st[lo:lo + b.shard_size], st, op=op, group=b.comm.group, async_op=overlap)
        if h is not None and overlap:
            self.pending.append((h, b, st))
            while len(self.pending) > MAX_PENDING_REDUCTIONS:
                self._finish_one_pending()
        else:
            self._accumulate_shard(b, st)
        b.num_ready = 0
        if self.ddp.zero3 is not None:
            self.ddp.zero3.on_bucket_reduced(b)

    def _accumulate_shard(self, b, st) -> None:
        lo = b.comm.rank * b.shard_size
        self.ddp.grad_buffer[b.shard_offset:b.shard_offset + b.shard_size].add_(st[lo:lo + b.shard_size])

    def _finish_one_pending(self) -> None:
        h, b, st = self.pending.pop(0)
        h.wait()
        self._accumulate_shard(b, st)

    def drain(self) -> None:
        """Wait for every reduce-scatter in flight and add it into the shard."""
        while self.pending:
            self._finish_one_pending()

    def reset(self) -> None:
        """Before the first microbatch of an iteration: no staging buffer is being filled."""
        self.staging.clear()
        for b in self.layout.buckets:
            b.extra.pop("filled", None)
