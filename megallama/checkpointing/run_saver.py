"""The training loop's saves: synchronous, or with ``--async-save`` scheduled in the background and published
later (async_save.py); each followed by its ``--log-progress`` line. The loop calls ``save`` where it saves,
``poll`` once per iteration (publishes an async save as soon as every rank has written it) and ``finish`` before it
returns or exits."""
from __future__ import annotations

import time
from typing import Optional

import torch

from megallama.checkpointing.async_save import (async_save_checkpoint, finalize_async_save, in_flight,
                                                 release_pinned)
from megallama.checkpointing.save_load import _say, save_checkpoint


class RunSaver:
    def __init__(self, args, model_chunks, optimizer, scheduler, progress=None, progress_log=None):
        self.args, self.model_chunks, self.optimizer, self.scheduler = args, model_chunks, optimizer, scheduler
        self.async_save = bool(getattr(args, "async_save", False))
        self.progress, self.log = progress, progress_log  # RunProgress (what Ctrl-C reports), ProgressLog

    def save(self, step: int, consumed: int, wait: bool = False) -> str:
        """Save iteration ``step``; returns its directory. ``wait``: an async save is published before returning
        (the run is about to stop)."""
        a = self.args
        if not self.async_save:
            path = save_checkpoint(a.save, step, self.model_chunks, self.optimizer, a, consumed, a.keep_last,
                                   scheduler=self.scheduler)
            _say(f"saved checkpoint to {path}")
            self._published(step)
            if self.log is not None:
                self.log.saved(step, consumed)
            return path
        t0 = time.time()
        finalize_async_save()  # the previous save's writers still busy (a --save-interval shorter than a write)
        t1 = time.time()
        req = async_save_checkpoint(a.save, step, self.model_chunks, self.optimizer, a, consumed, a.keep_last,
                                    scheduler=self.scheduler)
        req.finalize_fns.append(lambda: self._published(step, req.final))
        t2 = time.time()
        waited = f", {1e3 * (t1 - t0):.1f} ms of it waiting for the previous save" if t1 - t0 > 1e-3 else ""
        _say(f"scheduled an async checkpoint save at iteration {step:7d} to {a.save} (training blocked "
             f"{1e3 * (t2 - t0):.1f} ms{waited})")
        if self.log is not None:
            self.log.saved(step, consumed, async_save=True)
        if wait:
            self.finish()
        return req.final

    def poll(self, device: Optional[torch.device] = None) -> None:
        """Publish the async save in flight if every rank has written it (one all-reduce, only while one is)."""
        if in_flight() is not None:
            finalize_async_save(blocking=False, device=device)

    def finish(self) -> None:
        """Publish the async save in flight, waiting for its writers (the end of training, an exit); then no save
        follows, and the pinned host buffers are released."""
        try:
            finalize_async_save()
        finally:
            release_pinned()

    def _published(self, step: int, path: Optional[str] = None) -> None:
        if self.progress is not None:
            self.progress.saved = step
        if path is not None:  # an async save
            _say(f"saved checkpoint to {path} (async)")
            if self.log is not None:
                self.log.published(step)
