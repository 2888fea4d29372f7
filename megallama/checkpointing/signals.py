"""Save-and-exit on SIGTERM (cluster preemption, ``scancel``, torchrun shutting a job down); Ctrl-C reported.

The handler only records the signal; the loop asks ``should_exit()`` at the end of every iteration, which agrees
across ranks (one tiny all-reduce), so every rank saves the same iteration together and exits cleanly instead of
dying mid-step. Megatron's ``--exit-signal-handler`` does the same.

SIGINT (Ctrl-C) saves nothing, as in Megatron: the user asked to stop now. ``report_interrupt`` turns the
KeyboardInterrupt into ``TrainingInterrupted``, whose message the scripts print as one line (exit 130).
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Optional

import torch
import torch.distributed as dist


class ExitSignalHandler:
    def __init__(self, sig: int = signal.SIGTERM):
        self.sig, self.received, self.installed = sig, False, False
        try:
            self._previous = signal.signal(sig, self._handle)
            self.installed = True
            stale = getattr(self._previous, "__self__", None)
            if isinstance(stale, ExitSignalHandler):  # a run that died by an exception never released its handler
                self._previous = stale._previous
        except ValueError:  # not the main thread (an embedding application): leave signals to it
            self._previous = None

    def _handle(self, signum, frame):  # noqa: ARG002 - signal API
        self.received = True

    def should_exit(self, device: torch.device) -> bool:
        """True on every rank when any rank got the signal (collective when distributed)."""
        return any_rank(self.received, device)

    def release(self) -> None:
        if self.installed:
            signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (collective when distributed): a stop decided by one
    rank's clock or signal must be taken by all, or the others hang in the next step's collectives."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``pretrain``; the message says where the run stopped and what is on disk."""


class RunProgress:
    """What an interrupted run reports: the last finished iteration and the last checkpoint in --save."""

    def __init__(self, save: Optional[str]):
        from megallama.checkpointing.files import last_saved_iteration
        self.save, self.done = save, 0
        self.saved = last_saved_iteration(save) if save and os.path.isdir(save) else None

    def describe(self) -> str:
        if not self.save:
            where = "nothing saved (no --save)"
        elif self.saved is None:
            where = f"no checkpoint in {self.save} yet"
        else:
            where = f"the last checkpoint is iteration {self.saved} in {self.save}"
        return f"interrupted after iteration {self.done}; {where}"


@contextlib.contextmanager
def report_interrupt(progress: RunProgress):
    try:
        yield
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted(progress.describe()) from None
