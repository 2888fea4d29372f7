"""``--log-progress``: Megatron's job progress file, ``progress.txt`` in the --save directory, appended by every job
of a run (restarts included) from rank 0, one flushed line per event, tab-separated in Megatron's format so that
tools reading Megatron's file read this one::

    2025-06-01 12:00:00<TAB>Job ID: 4711<TAB># GPUs: 8<TAB>Starting job
    ...<TAB>Saved checkpoint<TAB>Iteration: 500<TAB>Job throughput: 312.4 TFLOP/s/GPU<TAB>Cumulative throughput:
        305.1 TFLOP/s/GPU<TAB>Floating-point operations: 1.23e+18<TAB>Tokens (in billions): 0.52
    ...<TAB>Saving async checkpoint<TAB>(the same fields)     with --async-save, when the save is scheduled,
    ...<TAB>Saved async checkpoint<TAB>Iteration: 500         and once it is published.

Job ID is ``$SLURM_JOB_ID``. Job throughput counts this job's FLOPs since it started; cumulative throughput counts
from the first "Starting job" of the latest run of jobs with this GPU count, read back from the file (as Megatron's
``get_start_time_from_progress_log``; an async save counts once its "Saved async checkpoint" line confirms it). When
this job starts that run of jobs (a --save directory new to the run it resumes), the FLOPs it resumed from count as
done before it, where Megatron's file-only reading counts them as this job's (``--load other_run --save new_dir``
would report the other run's FLOPs over this job's time).
FLOPs are the consumed tokens times megallama's FLOPs per token (6 x matmul parameters + 12 x layers x hidden x
sequence; for MoE the experts a token goes through, as Megatron counts them), as in the MFU of the log line.
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Optional, Tuple

FILENAME = "progress.txt"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_SAVES = ("Saved checkpoint", "Saving async checkpoint")


def add_progress_log_args(p) -> None:
    g = p.add_argument_group("progress log")
    g.add_argument("--log-progress", action="store_true", help="append job starts and, at each checkpoint, the "
                   "iteration, throughput, FLOPs and tokens so far to progress.txt in --save (Megatron's)")


def _field(token: str) -> str:
    return token.split(": ", 1)[1]


def cumulative_start(path: str, world_size: int) -> Optional[Tuple[float, float]]:
    """(start time, FLOPs done by then) of the first job of the latest run of jobs with ``world_size`` GPUs in a
    progress file; None when it has no such job."""
    start, latest, pending = None, 0.0, {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        tok = line.split("\t")
        try:
            gpus, what = int(_field(tok[2])), tok[3]
            if what in _SAVES:
                flops = float(_field(tok[7]))
                if what == _SAVES[0]:
                    latest = flops
                else:  # an async save counts once published
                    pending[tok[4]] = flops
            elif what == "Saved async checkpoint":
                latest = pending.pop(tok[4], latest)
            when = datetime.strptime(tok[0], _TIME_FORMAT).timestamp()
        except (IndexError, ValueError):
            continue  # not a progress line
        if gpus != world_size:  # a new run of jobs starts with another GPU count
            start = None
        elif what == "Starting job" and start is None:
            start = (when, latest)
    return start


class ProgressLog:
    """Rank 0's writer of ``progress.txt`` for one job; every method is a no-op elsewhere or without the flag."""

    def __init__(self, args, consumed_samples: int, flops_per_token: float, rank: int):
        self.enabled = bool(getattr(args, "log_progress", False) and args.save) and rank == 0
        self.path = os.path.join(args.save, FILENAME) if args.save else None
        self.world = int(getattr(args, "world_size", 1) or 1)
        self.seq_length, self.flops_per_token = args.seq_length, flops_per_token
        self.job_start = getattr(args, "run_start_time", None) or time.time()
        self.job_start_flops = self._flops(consumed_samples)
        self._append("Starting job", when=self.job_start)
        # lines this job appends later cannot move the start of its run of jobs: read the file once, not per save
        self.run_start = cumulative_start(self.path, self.world) if self.enabled else None

    def _flops(self, consumed_samples: int) -> float:
        return float(consumed_samples) * self.seq_length * self.flops_per_token

    def _append(self, text: str, when: Optional[float] = None) -> None:
        if not self.enabled:
            return
        stamp = datetime.fromtimestamp(time.time() if when is None else when).strftime(_TIME_FORMAT)
        with open(self.path, "a") as f:
            f.write(f"{stamp}\tJob ID: {os.environ.get('SLURM_JOB_ID', '')}\t# GPUs: {self.world}\t{text}\n")
            f.flush()

    def saved(self, iteration: int, consumed_samples: int, async_save: bool = False) -> None:
        """A checkpoint of ``iteration`` was written (or, with ``async_save``, scheduled)."""
        if not self.enabled:
            return
        now, flops = time.time(), self._flops(consumed_samples)
        job = (flops - self.job_start_flops) / (max(now - self.job_start, 1e-9) * 1e12 * self.world)
        t0, flops0 = self.run_start or (self.job_start, self.job_start_flops)
        if t0 >= int(self.job_start):  # this job starts the run of jobs (a new --save dir resuming another run's
            flops0 = self.job_start_flops  # checkpoint, or a new GPU count): the FLOPs it resumed from are not its
        cumulative = (flops - flops0) / (max(now - t0, 1e-9) * 1e12 * self.world)
        self._append(f"{_SAVES[1] if async_save else _SAVES[0]}\tIteration: {iteration}\t"
                     f"Job throughput: {job:.1f} TFLOP/s/GPU\tCumulative throughput: {cumulative:.1f} TFLOP/s/GPU\t"
                     f"Floating-point operations: {flops:.2e}\t"
                     f"Tokens (in billions): {consumed_samples * self.seq_length / 10**9:.2f}")

    def published(self, iteration: int) -> None:
        """An async save of ``iteration`` is finalized (Megatron's "Saved async checkpoint" line)."""
        self._append(f"Saved async checkpoint\tIteration: {iteration}")
