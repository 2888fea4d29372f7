"""Megatron's timers (``--timing-log-level``, ``--timing-log-option``): named wall-clock intervals of the training
step, summed per rank over a log interval and printed after the log line reduced over the ranks, in Megatron's
format (max / (min, max) / every rank), so that a straggler rank shows.

Level 0 keeps none (the log line's iteration time is the end-to-end one). Level 1 keeps Megatron's step phases
that megallama's loop owns: ``forward-backward``, ``all-grads-sync``, ``layernorm-grads-all-reduce``,
``embedding-grads-all-reduce`` and ``optimizer``; level 2 adds ``batch-generator``. Megatron's finer timers (the
optimizer's sub-steps, the schedule's compute and p2p) are not kept here: ``optimizer`` and ``forward-backward``
include them, and the flags say so in one line.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.initialize import warn_rank_0

# in Megatron's order (training_log's timers_to_log)
TIMERS_TO_LOG = ("forward-backward", "batch-generator", "layernorm-grads-all-reduce", "embedding-grads-all-reduce",
                 "all-grads-sync", "optimizer")
_LEVEL = {n: 2 if n == "batch-generator" else 1 for n in TIMERS_TO_LOG}


def add_timing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("timers (Megatron's)")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=0,
                   help="1: per-phase step times after each log line (forward-backward, all-grads-sync, optimizer "
                   "...); 2: also batch-generator")
    g.add_argument("--timing-log-option", choices=["max", "minmax", "all"], default="minmax",
                   help="reduce the phase times over the ranks: max, (min, max), or every rank's")
    g.add_argument("--no-barrier-with-level-1-timing", dest="barrier_with_L1_time", action="store_false",
                   help="level-1 timers start without a barrier (Megatron's: by default they start with one)")


def check_timing_flags(args) -> None:
    """What the levels here leave out of Megatron's, said once (the totals are timed)."""
    if args.timing_log_level >= 1:
        left_out = "the optimizer's sub-steps and params-all-gather (inside 'optimizer')"
        if args.timing_log_level == 2:
            left_out += ", and the schedule's forward-compute, backward-compute and p2p send/recv timers (inside " \
                        "'forward-backward')"
        warn_rank_0(f"--timing-log-level {args.timing_log_level}: megallama times {', '.join(_kept(args))}; "
                    f"Megatron's {left_out} are not timed separately")


def _kept(args) -> List[str]:
    return [n for n in TIMERS_TO_LOG if _LEVEL[n] <= args.timing_log_level]



class _Timer:
    def __init__(self, device):
        self.device, self.elapsed, self.started = device, 0.0, None

    def _sync(self, barrier: bool) -> None:
        if barrier and dist.is_initialized():
            dist.barrier()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, barrier: bool = False) -> None:
        self._sync(barrier)
        self.started = time.time()

    def stop(self, barrier: bool = False) -> None:
        self._sync(barrier)
        self.elapsed += time.time() - self.started
        self.started = None


class _NullTimer:
    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass


class Timers:
    """``timers(name)`` gives the named timer, or a no-op one above --timing-log-level (Megatron's interface).
    ``barrier`` is Megatron's barrier_with_L1_time: level-1 timers start with a barrier over the world."""

    def __init__(self, log_level: int, log_option: str, barrier: bool, device):
        self.log_level, self.log_option, self.barrier, self.device = log_level, log_option, barrier, device
        self._timers: Dict[str, _Timer] = {}
        self._null = _NullTimer()

    @classmethod
    def from_args(cls, args, device) -> "Timers":
        return cls(getattr(args, "timing_log_level", 0), getattr(args, "timing_log_option", "minmax"),
                   getattr(args, "barrier_with_L1_time", True), device)

    def __call__(self, name: str):
        if _LEVEL[name] > self.log_level:
            return self._null
        return self._timers.setdefault(name, _Timer(self.device))

    def start(self, name: str) -> None:
        """A level-1 timer starts with Megatron's barrier (unless --no-barrier-with-level-1-timing)."""
        self(name).start(barrier=self.barrier and _LEVEL[name] == 1)

    def stop(self, name: str) -> None:
        self(name).stop()

    def _all_ranks(self) -> torch.Tensor:
        """[world, names] elapsed ms since the last call (reset), from every rank: a collective."""
        mine = torch.tensor([self._timers[n].elapsed * 1e3 if n in self._timers else 0.0 for n in TIMERS_TO_LOG],
                            dtype=torch.float64)
        for t in self._timers.values():
            t.elapsed = 0.0
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine[None]
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        out = [torch.zeros_like(mine, device=dev) for _ in range(dist.get_world_size())]
        dist.all_gather(out, mine.to(dev))
        return torch.stack(out).cpu()

    def log(self, normalizer: float) -> Tuple[Optional[str], Dict[str, float]]:
        """Every rank calls this at the same steps; returns (text or None, {name: max ms per step}) where the
        text is Megatron's report of the times per step (``normalizer`` steps), or None below level 1."""
        if self.log_level == 0:
            return None, {}
        times = self._all_ranks() / normalizer
        maxima, lines = {}, []
        for i, name in enumerate(TIMERS_TO_LOG):
            ran = times[:, i][times[:, i] > 0]  # Megatron's: a timer no rank ran is left out
            if ran.numel() == 0:
                continue
            maxima[name] = float(ran.max())
            if self.log_option == "all":
                lines.append(f"  {name}:")
                lines += [f"     rank {r:2d}: {float(times[r, i]):.2f}" for r in range(times.shape[0])
                          if times[r, i] > 0]
            elif self.log_option == "max":
                lines.append(f"    {(name + ' ').ljust(48, '.')}: {maxima[name]:.2f}")
            else:
                lines.append(f"    {(name + ' ').ljust(48, '.')}: ({float(ran.min()):.2f}, {maxima[name]:.2f})")
        if not lines:
            return None, maxima
        head = {"all": "times across ranks (ms):", "max": "max time across ranks (ms):"}.get(
            self.log_option, "(min, max) time across ranks (ms):")
        return "\n".join([head] + lines), maxima


def timed_iterator(data_iter, timers: Timers):
    """Megatron's level-2 'batch-generator' timer: the time spent getting each microbatch."""
    while True:
        timers.start("batch-generator")
        try:
            batch = next(data_iter)
        except StopIteration:
            return
        finally:
            timers.stop("batch-generator")
        yield batch
