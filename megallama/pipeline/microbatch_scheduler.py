"""The seed API's ``MicrobatchScheduler``: one stage's view of a pipeline schedule, with user callbacks.

    scheduler = MicrobatchScheduler(num_microbatches=8, microbatch_size=2, num_pipeline_stages=4,
                                    current_stage=1, schedule_type="1f1b")   # or gpipe, interleaved, chimera, zb-h1
    schedule = scheduler.get_execution_schedule()          # [F0, F1, F2, B0, F3, B1, ...] for stage 1
    results = scheduler.execute_schedule(forward_fn, backward_fn, optimizer_fn, microbatches)
    scheduler.print_metrics()

``execute_schedule`` runs this stage's actions in order in this process: ``forward_fn(microbatch)`` (or
``forward_fn(microbatch, chunk)`` when the stage holds several chunks) returns an output that is later passed
to ``backward_fn(output)``; ``optimizer_fn()`` runs once at the end. It times every op; the metrics replay the
whole pipeline with those measured op times (every stage assumed to cost the same) to give the bubble fraction
next to the theory. Training across processes uses ``get_forward_backward_func``, which runs the same
schedules with real point-to-point communication.
"""
from __future__ import annotations

import inspect
import time
from typing import Callable, List, Optional, Sequence

from megallama.errors import ConfigError
from megallama.pipeline.schedules import B, F, W, Action, build_schedule, normalize_schedule_name
from megallama.pipeline.simulate import simulate, theoretical_bubble_fraction
from megallama.pipeline.timeline import render_text


def _arity(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


class MicrobatchScheduler:
    def __init__(self, num_microbatches: int, microbatch_size: int = 1, num_pipeline_stages: int = 1,
                 current_stage: int = 0, schedule_type: str = "1f1b", num_model_chunks: Optional[int] = None):
        name = normalize_schedule_name(schedule_type)
        if microbatch_size < 1:
            raise ConfigError(f"microbatch_size must be >= 1, got {microbatch_size}")
        if not 0 <= current_stage < max(1, num_pipeline_stages):
            raise ConfigError(f"current_stage {current_stage} is outside 0..{num_pipeline_stages - 1}; pass the "
                              "pipeline rank of this process")
        v = num_model_chunks if num_model_chunks is not None else (2 if name == "interleaved" else 1)
        self.schedule_type, self.num_model_chunks = name, v
        self.num_microbatches, self.microbatch_size = num_microbatches, microbatch_size
        self.num_pipeline_stages, self.current_stage = num_pipeline_stages, current_stage
        self.schedule = build_schedule(name, num_pipeline_stages, num_microbatches, v)
        self.metrics: dict = {}

    def get_execution_schedule(self) -> List[Action]:
        """This stage's ordered actions: ``Action(kind, microbatch, chunk)``, kind F / B / W (W: weight grads of
        zero-bubble schedules)."""
        return list(self.schedule.actions[self.current_stage])

    def timeline(self) -> str:
        """The whole pipeline drawn as text, one row per stage."""
        return render_text(self.schedule)

    def execute_schedule(self, forward_fn: Callable, backward_fn: Callable, optimizer_fn: Optional[Callable] = None,
                         microbatches: Optional[Sequence] = None, weight_grad_fn: Optional[Callable] = None) -> dict:
        """Run this stage's actions with the callbacks. ``microbatches[m]`` (default: the index m) is what
        ``forward_fn`` receives. With a zero-bubble schedule, ``weight_grad_fn(output)`` runs at W if given
        (else ``backward_fn`` is expected to do the whole backward at B). Returns {"outputs": forward outputs by
        microbatch (the last chunk's, for several chunks), "backward": backward_fn results by microbatch,
        "optimizer": optimizer_fn's result}."""
        if microbatches is not None and len(microbatches) != self.num_microbatches:
            raise ConfigError(f"got {len(microbatches)} microbatches for a schedule of {self.num_microbatches}")
        multi = self.schedule.num_chunks > 1 and _arity(forward_fn) >= 2
        store, outputs, backward = {}, {}, {}
        times = {F: [], B: [], W: []}
        held = peak = 0
        t_start = time.perf_counter()
        for a in self.get_execution_schedule():
            mb = microbatches[a.microbatch] if microbatches is not None else a.microbatch
            t0 = time.perf_counter()
            if a.kind == F:
                out = forward_fn(mb, a.chunk) if multi else forward_fn(mb)
                store[(a.microbatch, a.chunk)] = out
                outputs[a.microbatch] = out
                held += 1
                peak = max(peak, held)
            elif a.kind == B:
                backward[a.microbatch] = backward_fn(store[(a.microbatch, a.chunk)])
                if not self.schedule.split_backward:
                    del store[(a.microbatch, a.chunk)]
                    held -= 1
            else:
                out = store.pop((a.microbatch, a.chunk))
                if weight_grad_fn is not None:
                    weight_grad_fn(out)
                held -= 1
            times[a.kind].append(time.perf_counter() - t0)
        opt = optimizer_fn() if optimizer_fn is not None else None
        total = time.perf_counter() - t_start
        self.metrics = self._metrics(times, peak, total)
        return {"outputs": [outputs.get(m) for m in range(self.num_microbatches)],
                "backward": [backward.get(m) for m in range(self.num_microbatches)], "optimizer": opt}

    def _metrics(self, times, peak, total) -> dict:
        mean = {k: (sum(v) / len(v) if v else 0.0) for k, v in times.items()}
        costs = {F: max(mean[F], 1e-9), B: max(mean[B] + mean[W], 1e-9), W: mean[W]}
        replay = simulate(self.schedule, costs)
        return {"schedule": self.schedule_type, "stages": self.num_pipeline_stages, "stage": self.current_stage,
                "microbatches": self.num_microbatches, "microbatch_size": self.microbatch_size,
                "chunks_per_stage": self.schedule.num_chunks,
                "ops": {k: len(v) for k, v in times.items() if v}, "mean_op_seconds": mean,
                "compute_seconds": sum(sum(v) for v in times.values()), "wall_seconds": total,
                "peak_activations_in_flight": peak,
                "bubble_fraction": replay.bubble_fraction(),
                "bubble_fraction_theory": theoretical_bubble_fraction(
                    self.schedule_type, self.num_pipeline_stages, self.num_microbatches, self.num_model_chunks),
                "pipeline_seconds_estimate": replay.makespan}

    def print_metrics(self) -> dict:
        m = self.metrics
        if not m:
            print("MicrobatchScheduler: no schedule executed yet")
            return m
        mean = m["mean_op_seconds"]
        print(f"schedule {m['schedule']}: stage {m['stage']} of {m['stages']}, {m['microbatches']} microbatches of "
              f"{m['microbatch_size']}, {m['chunks_per_stage']} chunk(s) per stage")
        print(f"  ops {m['ops']}; mean forward {mean[F] * 1e3:.2f} ms, backward {mean[B] * 1e3:.2f} ms"
              + (f", weight-grad {mean[W] * 1e3:.2f} ms" if mean[W] else ""))
        print(f"  compute {m['compute_seconds']:.3f} s of {m['wall_seconds']:.3f} s; peak activations in flight "
              f"{m['peak_activations_in_flight']}")
        print(f"  bubble fraction {m['bubble_fraction']:.3f} (whole pipeline replayed with the measured op times; "
              f"theory {m['bubble_fraction_theory']:.3f}); pipeline step ~{m['pipeline_seconds_estimate']:.3f} s")
        return m
