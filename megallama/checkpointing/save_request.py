"""One checkpoint save in three phases, so that its writing can leave the training thread (``--async-save``).

1. ``SaveRequest.begin`` (collective, training thread): rank 0 makes ``iter_N.tmp``; every rank copies what it
   writes (model tensors, optimizer states, RNG and gradient-compressor state; on rank 0 the ``common.pt`` metadata)
   to host memory. From then on training may change the live tensors: the request holds copies.
2. ``write`` (no collectives; the training thread, or async_save's writer thread): this rank's ``rank_XXXXX.pt``
   and its size/CRC-32. A failure is recorded, not raised, so that every rank learns of it together in phase 3.
3. ``publish`` (collective, training thread): the ranks' piece lists, file descriptions and errors are gathered.
   After any rank's failure the temporary directory is removed and every rank raises the same ConfigError (earlier
   checkpoints untouched); otherwise rank 0 writes common.pt and the manifest, renames the directory into place,
   moves the tracker and prunes (``--keep-last``).

A synchronous save (``save_load.save_checkpoint``) runs the three phases back to back, so both kinds of save write
the same files.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megallama.checkpointing import files as F
from megallama.checkpointing.optimizer_state import optimizer_entries, skip_on_save
from megallama.checkpointing.save_load import (FORMAT_VERSION, _all_gather, _bcast, _first_error, _on, _rank,
                                               args_to_dict, current_layout)
from megallama.checkpointing.sharded import dtype_name, merge_indexes
from megallama.checkpointing.state import get_rng_state, is_replica_chunk, local_piece, named_model_tensors, writes
from megallama.errors import ConfigError
from megallama.optimizer.compression import compression_state


class _HostCopier:
    """Copies tensors to host memory. With a ``pinned`` pool (async saves) a CUDA tensor goes into a page-locked
    buffer kept by name for the next save (allocating pinned memory is slow) with a non-blocking copy, and
    ``event`` marks when the copies are done: the writer waits for it, the training thread does not."""

    def __init__(self, pinned: Optional[Dict[str, torch.Tensor]]):
        self.pinned, self.event = pinned, None

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.pinned is None or not t.is_cuda:
            return t.to("cpu", copy=True)
        buf = self.pinned.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.pinned[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        if self.event is None:
            self.event = torch.cuda.Event()
        return buf

    def tree(self, prefix: str, obj):
        """A copy of a nest of dicts/lists/tuples whose tensors are host copies (RNG, compressor, scheduler state)."""
        if torch.is_tensor(obj):
            return self(prefix, obj)
        if isinstance(obj, dict):
            return {k: self.tree(f"{prefix}/{k}", v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self.tree(f"{prefix}/{i}", v) for i, v in enumerate(obj)]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return obj

    def done(self) -> Optional["torch.cuda.Event"]:
        if self.event is not None:
            self.event.record()  # after every copy queued on this stream
        return self.event


class SaveRequest:
    def __init__(self, save: str, iteration: int, keep_last: Optional[int]):
        self.save, self.iteration, self.keep_last = save, iteration, keep_last
        self.final = F.checkpoint_dir(save, iteration)
        self.tmp = self.final + ".tmp"
        self.fname = f"rank_{_rank():05d}.pt"
        self.index: Dict[str, dict] = {}
        self.payload: Optional[dict] = None  # this rank's file, in host memory until written
        self.common: Optional[dict] = None  # rank 0's common.pt, less the merged index
        self.copied = None  # CUDA event: the non-blocking device-to-host copies are done
        self.desc: Optional[dict] = None
        self.err: Optional[str] = None
        self.finalize_fns: List[Callable[[], None]] = []  # run on every rank once published (Megatron's name)

    @classmethod
    def begin(cls, save: str, iteration: int, model_chunks, optimizer, args, consumed_samples: int,
              keep_last: Optional[int] = None, extra: Optional[dict] = None, scheduler=None,
              pinned: Optional[Dict[str, torch.Tensor]] = None) -> "SaveRequest":
        """Phase 1: the temporary directory, and host copies of everything this rank writes."""
        req = cls(save, iteration, keep_last)
        err = None
        if _rank() == 0:
            try:
                os.makedirs(save, exist_ok=True)
                F.remove_stale_tmp(save, keep=req.tmp)
                if os.path.exists(req.tmp):
                    shutil.rmtree(req.tmp)
                os.makedirs(req.tmp)
            except OSError as e:
                err = f"{e.strerror or e}"
        raise_save_error(_first_error(err), req.final, req.tmp)

        copy, tensors = _HostCopier(pinned), {}

        def add(name, t, piece):
            tensors[name] = copy(name, t)
            req.index[name] = {"shape": piece.shape, "dtype": dtype_name(t), "pieces": [piece.to_dict(req.fname)]}

        for ci, name, t, p in named_model_tensors(model_chunks):
            if not skip_on_save(name) and not is_replica_chunk(model_chunks, ci) and writes(t if p is None else p):
                add(name, t, local_piece(t, p))
        entries, scalars = optimizer_entries(optimizer, model_chunks)
        if getattr(args, "no_save_optim", False):  # Megatron's --no-save-optim: weights (and RNG) only
            entries, scalars = [], {}
        for name, t, piece in entries:
            add(name, t, piece)
        from megallama.checkpointing.fp8_state import fp8_state_entries  # --fp8-recipe delayed: amax histories
        for name, t, piece in fp8_state_entries(model_chunks):
            add(name, t, piece)
        req.payload = {"tensors": tensors, "rng": copy.tree("rng", get_rng_state())}
        comp = None if getattr(args, "no_save_compression_state", False) else compression_state(model_chunks)
        if comp is not None:  # per-rank error memories etc., restored like the RNG state (same layout only)
            req.payload["compression"] = copy.tree("compression", comp)
        if _rank() == 0:
            req.common = copy.tree("common", {
                "format": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
                "args": args_to_dict(args) if args is not None else {}, "layout": current_layout(),
                "zero_stage": getattr(args, "zero_stage", 0) if args is not None else 0,
                "optimizer_scalars": scalars, "extra": extra or {}})
            if scheduler is not None:
                req.common["opt_param_scheduler"] = copy.tree("scheduler", scheduler.state_dict())
        req.copied = copy.done()
        return req

    @property
    def path(self) -> str:
        return os.path.join(self.tmp, self.fname)

    def write(self) -> None:
        """Phase 2: this rank's file. Never raises: ``publish`` reports a failure on every rank alike."""
        try:
            if self.copied is not None:
                self.copied.synchronize()
            F.atomic_torch_save(self.payload, self.path)
            self.desc = F.describe_file(self.path)
        except OSError as e:
            self.err = f"{e.strerror or e}"
        except Exception as e:  # noqa: BLE001 - a writer thread has no one else to tell
            self.err = f"{type(e).__name__}: {e}".splitlines()[0]
        finally:
            self.payload = None  # the host copies (a pinned pool keeps its buffers for the next save)

    def publish(self) -> str:
        """Phase 3 (collective): agree that every rank wrote its file, then make the checkpoint the latest."""
        parts = _all_gather((self.index, {self.fname: self.desc}, self.err))
        raise_save_error(next((p[2] for p in parts if p[2]), None), self.final, self.tmp)
        err = None
        if _rank() == 0:
            try:
                common = dict(self.common, index=merge_indexes(p[0] for p in parts))
                F.atomic_torch_save(common, os.path.join(self.tmp, F.COMMON))
                manifest = {k: v for p in parts for k, v in p[1].items()}
                manifest[F.COMMON] = F.describe_file(os.path.join(self.tmp, F.COMMON))
                F.write_manifest(self.tmp, manifest)
                F.publish(self.tmp, self.final)
                F.write_tracker(self.save, self.iteration)
            except OSError as e:
                err = f"{e.strerror or e}"
        raise_save_error(_bcast(err), self.final, self.tmp)
        if _rank() == 0 and self.keep_last:
            F.prune(self.save, self.keep_last, protect=self.iteration)
        if _on():
            dist.barrier()
        for fn in self.finalize_fns:
            fn()
        return self.final


def raise_save_error(err: Optional[str], final: str, tmp: str) -> None:
    """The one error of a failed save, on every rank (``err`` is agreed): the partial directory goes, the earlier
    checkpoints and the tracker stay."""
    if not err:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if _on():
        dist.barrier()
    raise ConfigError(f"could not write checkpoint {final} ({err}); earlier checkpoints are kept — free space or "
                      "point --save at a writable disk")
