"""``--async-save``: the training loop pays only for copying the state to host memory; the files are written in the
background and the checkpoint is published later (Megatron's async save).

At a save, every rank snapshots its state (``SaveRequest.begin``: host copies, page-locked with non-blocking copies
where CUDA) and hands the request to a writer thread. The checkpoint stays ``iter_N.tmp`` — never the latest — until
it is *finalized*: every rank's writer has finished, and ``publish`` (collective) agrees on success, and rank 0
writes common.pt and the manifest, renames the directory, moves the tracker and prunes. That happens when the loop
finds every writer done (``finalize_async_save(blocking=False)``: one all-reduce per iteration while a save is in
flight), at the next save (at most one save is in flight), at the end of training or an exit (signal,
--exit-interval, --exit-duration-in-mins), and before any load. A writer's failure raises, at finalization and on
every rank, the ConfigError a synchronous save gives; the previous checkpoint stays the latest. A process killed
before finalization leaves only ``iter_N.tmp``, removed by the next save into that directory.

Why a thread and not a process (Megatron forks one): the snapshot is already in this process's memory, and a thread
writes it as it is, where a process would need it copied or moved to shared memory first, and a fork of a process
holding CUDA and NCCL state is unsafe. The work is writing (``write``, ``fsync``) and ``zlib.crc32``, which release
the GIL, so the training thread keeps running; pickling the small metadata is the only Python-bound part. The
thread runs no collectives (those stay on the training thread, in begin and publish), and it is a daemon: a
process that exits (or is killed) mid-write leaves an unpublished ``.tmp``, never a checkpoint named the latest.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.checkpointing.save_request import SaveRequest
from megallama.checkpointing.signals import any_rank

_IN_FLIGHT: Optional[Tuple[SaveRequest, threading.Thread]] = None
_PINNED: Dict[str, torch.Tensor] = {}  # page-locked host buffers by tensor name, reused by a run's async saves


def async_save_checkpoint(save: str, iteration: int, model_chunks, optimizer, args, consumed_samples: int,
                          keep_last: Optional[int] = None, extra: Optional[dict] = None,
                          scheduler=None) -> SaveRequest:
    """Snapshot this iteration and start writing it in the background (collective, like ``save_checkpoint``). The
    save in flight, if any, is published first. Returns the request (``.final``: where it will be published)."""
    finalize_async_save()
    req = SaveRequest.begin(save, iteration, model_chunks, optimizer, args, consumed_samples, keep_last, extra,
                            scheduler, pinned=_PINNED)
    start_writer(req)
    return req


def start_writer(req: SaveRequest) -> None:
    """Write ``req``'s file on a background thread; it becomes the save in flight."""
    global _IN_FLIGHT
    if _IN_FLIGHT is not None:
        raise RuntimeError("a checkpoint save is already in flight; finalize_async_save() first")
    thread = threading.Thread(target=req.write, name=f"checkpoint-writer-{req.iteration}", daemon=True)
    thread.start()
    _IN_FLIGHT = (req, thread)


def in_flight() -> Optional[SaveRequest]:
    return _IN_FLIGHT[0] if _IN_FLIGHT is not None else None


def finalize_async_save(blocking: bool = True, device: Optional[torch.device] = None) -> Optional[str]:
    """Publish the save in flight; collective (every rank calls it at the same point), a no-op when none is.
    ``blocking=False``: only if every rank's writer has already finished (one all-reduce), else return None at once.
    Returns the published checkpoint directory; a failed save raises its ConfigError on every rank."""
    global _IN_FLIGHT
    if _IN_FLIGHT is None:
        return None
    req, thread = _IN_FLIGHT
    if not blocking and any_rank(thread.is_alive(), device or _device()):
        return None
    thread.join()
    _IN_FLIGHT = None  # before publish: a failed save is over too
    return req.publish()


def abandon_async_save() -> None:
    """A run that stops on an error: wait for this rank's writer (so that it writes nothing later) and drop the
    save unpublished. No collectives: the other ranks may be gone."""
    global _IN_FLIGHT
    if _IN_FLIGHT is not None:
        _IN_FLIGHT[1].join()
        _IN_FLIGHT = None
    release_pinned()


def release_pinned() -> None:
    """The run is over: its page-locked buffers (the size of this rank's checkpoint) go back to the OS. Kept, they
    would stay locked in RAM for as long as the process lives (an API user's next run, a notebook, a sweep)."""
    if _IN_FLIGHT is None:
        _PINNED.clear()


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
