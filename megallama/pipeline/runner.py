"""One runner for every schedule: walks this stage's program (``plan.py``), doing the computes and the p2p.

Same contract as ``forward_backward_no_pipelining`` (Megatron's ``forward_backward_func``): the user's
``forward_step_func(data_iterator, model) -> (output, loss_func)`` knows nothing about pipelining; on chunks
after the first part the runner calls ``set_input_tensor([hidden])`` (a one-element list, as Megatron-core
does) before the step and ``set_input_tensor([None])`` after it. User stage modules need that method and
``config.hidden_size`` (sizes the p2p buffers with seq_length and micro_batch_size, as Megatron-core's config
does); ``sequence_parallel`` is read from the module or its config (default off). At pp > 1 the runner sets
``pipeline_schedule`` on every chunk (as ``build_model_chunks`` does): Chimera's replica grad sum
(``allreduce_embedding_gradients``) and the optimizer's norm read it. Each microbatch's loss is divided by the
number of microbatches. Returns the loss dicts in microbatch order on the last stage (Chimera's upward losses
are sent there), [] elsewhere. ``runner.stats`` keeps the last call's op intervals, the peak number of
microbatch-chunks whose activations were held and the peak bytes of the outputs held for their backwards.

An output sent to another stage is deallocated once handed to the send (``deallocate.py``, Megatron's
--deallocate-pipeline-outputs): only the send buffer holds its storage then, until the transfer is over.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional

import torch

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu import weight_grad_store
from megallama.optimizer.distributed import is_zero3
from megallama.pipeline.deallocate import backward_from, deallocate_output
from megallama.pipeline.microbatch_data import MicrobatchData
from megallama.pipeline.model_chunks import unwrap_model
from megallama.pipeline.no_pipelining import check_megatron_keywords, forward_backward_no_pipelining, maybe_no_sync
from megallama.pipeline.p2p import (P2POp, batch_send_recv, buffer_dtype_and_device, buffer_shape,
                                    sends_report_completion, stage_rank, warm_up_group)
from megallama.pipeline.plan import consumed_message, produced_message, stage_program
from megallama.pipeline.schedules import B, F, W, normalize_schedule_name

_LOSS_TAG = (1 << 30) + (1 << 20)


class PipelineRunner:
    """``get_forward_backward_func(p, name)`` returns one of these; call it like the no-pipelining function."""

    def __init__(self, schedule: str, time_ops: bool = False, microbatch_group_size: Optional[int] = None,
                 deallocate_outputs: bool = True):
        self.schedule = normalize_schedule_name(schedule)
        self.time_ops = time_ops  # synchronise the compute stream around each op so stats hold device time
        self.group_size = microbatch_group_size  # interleaved: microbatches per group (None: pp)
        self.deallocate_outputs = deallocate_outputs  # False keeps every output whole until its backward
        self.stats: dict = {}

    def __call__(self, forward_step_func: Callable, data_iterator, model, num_microbatches: int,
                 seq_length: Optional[int] = None, micro_batch_size: Optional[int] = None,
                 forward_only: bool = False, grad_scale_func: Optional[Callable] = None, *,
                 decoder_seq_length: Optional[int] = None, collect_non_loss_data: bool = False,
                 first_val_step: Optional[bool] = None) -> List:
        """Megatron-core's keywords as ``forward_backward_no_pipelining`` takes them (its docstring says how)."""
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        p = ps.get_pipeline_model_parallel_world_size()
        if p == 1:
            return forward_backward_no_pipelining(forward_step_func, data_iterator, chunks, num_microbatches,
                                                  seq_length, micro_batch_size, forward_only, grad_scale_func,
                                                  decoder_seq_length=decoder_seq_length,
                                                  collect_non_loss_data=collect_non_loss_data)
        check_megatron_keywords(seq_length, decoder_seq_length, collect_non_loss_data, forward_only)
        if collect_non_loss_data and self.schedule == "chimera":
            raise ConfigError("collect_non_loss_data under chimera: half the microbatches end on stage 0 and only "
                              "losses are sent on from there; evaluate with --pipeline-schedule 1f1b")
        v = len(chunks) if self.schedule == "interleaved" else 1
        want = 2 if self.schedule == "chimera" else v
        if len(chunks) != want:
            raise ConfigError(f"schedule '{self.schedule}' runs {want} model chunk(s) per stage, got {len(chunks)}; "
                              "build them with megallama.pipeline.build_model_chunks for the same schedule")
        for c in chunks:  # finalize's replica sum and the optimizer's norm read it (user-built chunks too)
            unwrap_model(c).pipeline_schedule = self.schedule
        run = _StageRun(self.schedule, chunks, num_microbatches, v, forward_only, grad_scale_func,
                        seq_length, micro_batch_size, self.time_ops, self.group_size, self.deallocate_outputs,
                        collect_non_loss_data)
        losses = run.execute(forward_step_func, data_iterator)
        self.stats = run.stats()
        return losses


def get_forward_backward_func(pipeline_model_parallel_size: Optional[int] = None, schedule: Optional[str] = None,
                              *, time_ops: bool = False, microbatch_group_size: Optional[int] = None,
                              deallocate_outputs: bool = True):
    """The forward/backward function for a layout: no pipelining for pp = 1, else a runner for ``schedule``
    (gpipe, 1f1b, interleaved, chimera, zb-h1). Called with no arguments it reads the layout from parallel_state
    as Megatron-core does: pp from the pipeline group, interleaved when a virtual pipeline size > 1 was set there,
    else 1F1B. ``time_ops`` makes ``runner.stats`` hold device time per op on
    CUDA: it synchronises the compute stream after each receive and each op; use it to profile, not to train.
    CPU ops are timed by the clock. ``microbatch_group_size``: Megatron's
    --microbatch-group-size-per-virtual-pipeline-stage (interleaved; None: pp). ``deallocate_outputs=False``
    keeps sent outputs whole until their backward (to compare; the results are the same)."""
    grid = ps.model_parallel_is_initialized()
    if pipeline_model_parallel_size is None:
        pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size() if grid else 1
    if schedule is None:
        vpp = ps.get_virtual_pipeline_model_parallel_world_size() if grid else None
        schedule = "interleaved" if (vpp or 1) > 1 else "1f1b"
    name = normalize_schedule_name(schedule)
    if pipeline_model_parallel_size <= 1:
        return forward_backward_no_pipelining
    return PipelineRunner(name, time_ops, microbatch_group_size, deallocate_outputs)


class _StageRun:
    def __init__(self, name, chunks, num_microbatches, v, forward_only, grad_scale_func, seq_length,
                 micro_batch_size, time_ops=False, group_size=None, deallocate=True, collect_non_loss_data=False):
        self.stage = ps.get_pipeline_model_parallel_rank()
        p = ps.get_pipeline_model_parallel_world_size()
        self.sched, self.program = stage_program(name, p, num_microbatches, v, self.stage, forward_only, group_size)
        self.deallocate = deallocate
        self.chunks, self.inner = chunks, [unwrap_model(c) for c in chunks]
        self.parts = [self.sched.part_of(self.stage, c) for c in range(len(chunks))]
        for c, m in enumerate(self.inner):
            k = getattr(m, "pipeline_part", self.parts[c])
            if k != self.parts[c]:
                raise ConfigError(f"model chunk {c} holds part {k} but schedule '{name}' runs part {self.parts[c]} "
                                  "there; build the chunks for the same schedule")
            if k > 0 and not callable(getattr(m, "set_input_tensor", None)):
                raise ConfigError(f"model chunk {c} ({type(m).__name__}) runs part {k} but has no "
                                  "set_input_tensor(input_tensor) to take the previous stage's hidden state (a "
                                  "one-element list); add one, as Megatron-core stage modules have")
        self.M, self.K = num_microbatches, self.sched.num_parts
        self.forward_only, self.grad_scale_func = forward_only, grad_scale_func
        self.collect_non_loss_data = collect_non_loss_data  # forward only (checked): keep loss_func's data
        self.dtype, self.device = buffer_dtype_and_device(self.inner)
        # The compute stream, not the device: a device-wide sync would also wait for receives posted ahead
        self.sync = (lambda: torch.cuda.current_stream(self.device).synchronize()) \
            if time_ops and self.device.type == "cuda" else (lambda: None)
        self.shape = buffer_shape(self.inner[0], seq_length, micro_batch_size)
        self.group = ps.get_pipeline_model_parallel_group()
        self.poll_sends = sends_report_completion(self.group)
        self.inputs: Dict[tuple, Optional[torch.Tensor]] = {}
        self.outputs: Dict[tuple, torch.Tensor] = {}
        self.out_grads: Dict[tuple, Optional[torch.Tensor]] = {}  # W by recomputation: B's output grads
        self.deferred: Dict[tuple, list] = {}  # W from queued GEMMs: what B left (weight_grad_store)
        self.outbox: Dict[tuple, torch.Tensor] = {}
        self.mailbox: Dict[tuple, torch.Tensor] = {}
        self.recvs: Dict[tuple, tuple] = {}
        self.sends: List[tuple] = []
        self.losses: Dict[int, dict] = {}
        self.held = self.peak = 0
        self.out_bytes = self.out_bytes_peak = 0  # storage bytes of the outputs held for their backwards
        self.intervals: List[tuple] = []
        # Stages 0-1 of DDP reduce on the last op giving a chunk's grads and run the others under no_sync: under a
        # B/W split both the last B (the grads B gives) and the last W (the rest) of each chunk.
        last = {(a.chunk, a.kind): a for a in self.sched.actions[self.stage] if a.kind != F}
        self.sync_ops = set(last.values())
        self.peers = {stage_rank(m.dst if is_send else m.src) for step in self.program for is_send, m in step.ops}

    # ---------- messages ----------
    @staticmethod
    def _key(msg):
        return (msg.kind, msg.microbatch, msg.part)

    def _deliver(self, msg, tensor: torch.Tensor) -> None:
        t = tensor.detach().to(self.dtype).contiguous()
        (self.mailbox if msg.dst == self.stage else self.outbox)[self._key(msg)] = t

    def _take(self, msg) -> torch.Tensor:
        if msg.src == self.stage:
            return self.mailbox.pop(self._key(msg))
        work, buf = self.recvs.pop(self._key(msg))
        work.wait()
        return buf

    def _reap_sends(self) -> None:
        """Before each compute, let go of the send buffers whose transfer is over (a deallocated output's storage
        goes with its buffer). NCCL's works tell when they are done; gloo's only once waited, and waiting for
        the sends posted so far cannot deadlock: the plan finishes even when every batch blocks until its peers
        have posted their halves (``tests/pipeline/test_pipeline_schedules.py`` checks that)."""
        if self.poll_sends:
            self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]
            return
        for w, _ in self.sends:
            w.wait()
        self.sends = []

    def _post(self, ops) -> None:
        if not ops:
            return
        p2p = []
        for is_send, msg in ops:
            if is_send:
                t = self.outbox.pop(self._key(msg))
                p2p.append(P2POp(True, t, stage_rank(msg.dst), msg.tag(self.M)))
            else:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                p2p.append(P2POp(False, buf, stage_rank(msg.src), msg.tag(self.M)))
        works = batch_send_recv(p2p, self.group)
        for (is_send, msg), op, w in zip(ops, p2p, works):
            if is_send:
                self.sends.append((w, op.tensor))
            else:
                self.recvs[self._key(msg)] = (w, op.tensor)

    # ---------- computes ----------
    def _forward(self, a, received, fwd_step, data) -> None:
        c, m = a.chunk, a.microbatch
        k, inner = self.parts[c], self.inner[c]
        x = None
        if received is not None:
            x = received.detach().requires_grad_(not self.forward_only and torch.is_grad_enabled())
        if k > 0:
            inner.set_input_tensor([x])  # a list, as Megatron-core passes it
        out, loss_func = fwd_step(data.get(m, c), self.chunks[c])
        if k > 0:
            inner.set_input_tensor([None])
        if k == self.K - 1:
            if self.collect_non_loss_data:
                self.losses[m] = loss_func(out, non_loss_data=True)
                return
            loss, reduced = loss_func(out)
            self.losses[m] = reduced
            if self.forward_only:
                return
            out = loss / self.M
            if self.grad_scale_func is not None:
                out = self.grad_scale_func(out)
        else:
            if tuple(out.shape) != self.shape:
                raise ConfigError(f"stage {self.stage} produced a hidden state of shape {tuple(out.shape)} but the "
                                  f"pipeline buffers are {self.shape} (micro_batch_size, seq_length, hidden); pass "
                                  "the seq_length and micro_batch_size the data has")
            msg = produced_message(self.sched, self.stage, a)
            self._deliver(msg, out)
            if self.forward_only:
                return
            if self.deallocate and msg.dst != self.stage:  # a chunk feeding one here reads the same storage
                deallocate_output(out)
        self.inputs[(m, c)], self.outputs[(m, c)] = x, out
        self.held += 1
        self.peak = max(self.peak, self.held)
        self.out_bytes += out.untyped_storage().nbytes()
        self.out_bytes_peak = max(self.out_bytes_peak, self.out_bytes)

    def _defers(self, chunk: int) -> bool:
        """ZB's B/W split: B runs the whole backward with the linear layers' weight-grad GEMMs queued
        (weight_grad_store) and W runs them. Not under ZeRO-3, which frees the gathered weights between B and W."""
        return self.sched.split_backward and not is_zero3(self.chunks[chunk])

    def _recomputes(self, chunk: int) -> bool:
        """The split under ZeRO-3: B computes the input grads only and W runs the backward again for the weight
        grads, recomputing the input-grad chain. Not for the part holding the head: the loss layer's in-place
        backward cannot run twice, so that part does its whole backward in B."""
        return self.sched.split_backward and not self._defers(chunk) and self.parts[chunk] != self.K - 1

    def _grad_ctx(self, a):
        return contextlib.nullcontext() if a in self.sync_ops else maybe_no_sync(self.chunks[a.chunk])

    def _backward(self, a, received) -> None:
        c, m = a.chunk, a.microbatch
        x, out = self.inputs[(m, c)], self.outputs[(m, c)]
        grad = received.to(out.dtype) if received is not None else None
        if self._defers(c):  # the whole backward, its linear layers' weight-grad GEMMs queued for W
            with self._grad_ctx(a), weight_grad_store.capture() as pending:
                backward_from(out, grad)
            self.deferred[(m, c)] = pending
            self.out_bytes -= out.untyped_storage().nbytes()
            del self.inputs[(m, c)], self.outputs[(m, c)]  # the graph is freed; W needs only what B queued
        elif self._recomputes(c):  # input grads only; W runs the backward again for the weight grads
            if x is not None:
                backward_from(out, grad, inputs=[x], retain_graph=True)
            self.out_grads[(m, c)] = grad
        else:
            with self._grad_ctx(a):
                backward_from(out, grad)
            self._release(m, c)
        if self.parts[c] > 0:
            self._deliver(produced_message(self.sched, self.stage, a), x.grad)

    def _weight_grad(self, a) -> None:
        c, m = a.chunk, a.microbatch
        if self._defers(c):
            with self._grad_ctx(a):
                weight_grad_store.apply(self.deferred.pop((m, c)))
            self.held -= 1  # B's queued tensors were this microbatch's stored activations
            return
        if not self._recomputes(c):
            return
        out, grad = self.outputs[(m, c)], self.out_grads.pop((m, c))
        params = [q for q in self.inner[c].parameters() if q.requires_grad]
        if not params:  # an empty stage: B passed the grad on; with no inputs the engine would redo that
            self._release(m, c)
            return
        with self._grad_ctx(a):
            backward_from(out, grad, inputs=params)
        self._release(m, c)

    def _release(self, m, c) -> None:
        self.inputs.pop((m, c), None)
        out = self.outputs.pop((m, c), None)
        if out is not None:
            self.out_bytes -= out.untyped_storage().nbytes()
        self.held -= 1

    # ---------- the loop ----------
    def execute(self, forward_step_func, data_iterator) -> List[dict]:
        warm_up_group(self.group, self.peers)
        data = MicrobatchData(data_iterator, self.sched.actions[self.stage], len(self.chunks), self.M)
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        prev_vpp = ps.get_virtual_pipeline_model_parallel_rank()
        self.t_start = time.perf_counter()
        try:
            for step in self.program:
                self._post(step.ops)
                a = step.compute
                if a is None:
                    continue
                self._reap_sends()
                if vpp:
                    ps.set_virtual_pipeline_model_parallel_rank(a.chunk)
                need = consumed_message(self.sched, self.stage, a) if a.kind != W else None
                received = self._take(need) if need is not None else None  # waiting is not compute time
                self.sync()
                t0 = time.perf_counter()
                if a.kind == F:
                    self._forward(a, received, forward_step_func, data)
                elif a.kind == B:
                    self._backward(a, received)
                else:
                    self._weight_grad(a)
                self.sync()
                self.intervals.append((a.kind, a.microbatch, a.chunk, t0, time.perf_counter()))
            data.drain()
            for w, _ in self.sends:
                w.wait()
        finally:
            if vpp:
                ps.set_virtual_pipeline_model_parallel_rank(prev_vpp)
        self.t_end = time.perf_counter()
        return self._gather_losses()

    def _gather_losses(self) -> List[dict]:
        """Losses come out where a microbatch's last part ran; Chimera's upward ones are sent to the last stage."""
        p = self.sched.num_stages
        owner = {m: self.sched.location(m, self.K - 1)[0] for m in range(self.M)}
        senders = sorted({s for s in owner.values() if s != p - 1})
        if not senders:
            return [self.losses[m] for m in range(self.M)] if self.stage == p - 1 else []
        keys = sorted(self.losses[min(self.losses)]) if self.losses else None
        if self.stage in senders:
            flat = torch.cat([torch.as_tensor(self.losses[m][key], device=self.device).double().reshape(-1)
                              for m in sorted(self.losses) for key in keys])
            batch_send_recv([P2POp(True, flat, stage_rank(p - 1), _LOSS_TAG + self.stage)], self.group)[0].wait()
            return []
        if self.stage != p - 1:
            return []
        ref = self.losses[min(self.losses)]
        sizes = [torch.as_tensor(ref[key]).numel() for key in keys]
        for s in senders:
            ms = [m for m in range(self.M) if owner[m] == s]
            buf = torch.empty(len(ms) * sum(sizes), dtype=torch.float64, device=self.device)
            batch_send_recv([P2POp(False, buf, stage_rank(s), _LOSS_TAG + s)], self.group)[0].wait()
            off = 0
            for m in ms:
                d = {}
                for key, n in zip(keys, sizes):
                    r = torch.as_tensor(ref[key])
                    d[key] = buf[off:off + n].view(r.shape).to(r.dtype)
                    off += n
                self.losses[m] = d
        return [self.losses[m] for m in range(self.M)]

    def stats(self) -> dict:
        return {"schedule": self.sched.name, "stage": self.stage, "peak_in_flight": self.peak,
                "peak_output_bytes": self.out_bytes_peak, "intervals": list(self.intervals),
                "start": self.t_start, "end": self.t_end}
