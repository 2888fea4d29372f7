"""``--profile-step N``: one training iteration under torch.profiler, summarised as the top kernels.

Prints (rank 0) the 10 CUDA kernels with the most device time in iteration N and their share of that iteration's
wall time, plus how busy the GPU was (kernel time / wall time: the rest is launch gaps and host syncs). On a CPU
run the same table lists the top operators by self CPU time, so the option is testable without a GPU.
"""
from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch

from megallama.errors import ConfigError


def _short(name: str, width: int = 96) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def top_kernels(prof, device_type: str, k: int = 10) -> Tuple[List[Tuple[str, float, int]], float]:
    """[(name, self time in us, calls)] of the k heaviest kernels (CUDA) or operators (CPU), and their total."""
    rows = []
    for e in prof.key_averages():
        if device_type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
                continue
            rows.append((e.key, float(e.self_device_time_total), int(e.count)))
        elif e.self_cpu_time_total > 0:
            rows.append((e.key, float(e.self_cpu_time_total), int(e.count)))
    rows.sort(key=lambda r: -r[1])
    return rows[:k], sum(r[1] for r in rows)


def format_summary(step: int, wall_s: float, rows, total_us: float, device_type: str) -> str:
    wall_us = wall_s * 1e6
    what = "CUDA kernels" if device_type == "cuda" else "CPU operators (self time)"
    lines = [f"profile of iteration {step}: wall {wall_s * 1e3:.1f} ms, {what} total {total_us / 1e3:.1f} ms "
             f"({total_us / wall_us:.1%} of the step)",
             "| # | kernel | calls | ms | share of step |", "|---|---|---|---|---|"]
    for i, (name, us, calls) in enumerate(rows, 1):
        lines.append(f"| {i} | `{_short(name)}` | {calls} | {us / 1e3:.2f} | {us / wall_us:.1%} |")
    return "\n".join(lines)


class StepProfiler:
    """Wraps one iteration: ``begin(step)`` before it, ``end(step)`` after it (both no-ops on other steps)."""

    def __init__(self, step: Optional[int], device: torch.device, enabled: bool = True, printer=print):
        if step is not None and step < 1:
            raise ConfigError(f"--profile-step {step} must be an iteration number >= 1; drop it to run unprofiled")
        self.step, self.device, self.enabled, self.print = step, device, enabled and bool(step), printer
        self._prof, self._t0, self.summary = None, 0.0, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        if not self.enabled or step != self.step:
            return
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if self._prof is None or step != self.step:
            return
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        rows, total = top_kernels(self._prof, self.device.type)
        self.summary = format_summary(step, wall, rows, total, self.device.type)
        self.print(self.summary)
        self._prof = None
