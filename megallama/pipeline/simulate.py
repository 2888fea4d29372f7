"""Run all stages of a schedule against each other with fixed op costs: timeline, bubble, activations in flight.

Dependencies: F(m, k) needs F(m, k-1); B(m, k) needs F(m, k) and B(m, k+1); W(m, k) needs B(m, k). A stage runs
its actions in order, each as soon as the previous one ended and its inputs exist (communication is free).
If no stage can move while work is left the schedule deadlocks and ``ScheduleDeadlock`` says where.
The bubble fraction is idle / (stages x makespan): (p-1)/(m+p-1) for 1F1B, (p-1)/(v*m+p-1) interleaved.

Parts may cost differently (``part_costs``): an uneven split (``args.pipeline_layer_counts``, a layout such as
``Ett|t|tt|tttL``, an E-only or L-only stage) leaves idle time the even formulas do not see, so the bubble of such a
run comes from ``part_weights`` (decoder layers, plus the embedding / head in the partitioner's cost units).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from megallama.pipeline.partition import StageCosts
from megallama.pipeline.schedules import B, F, W, Action, PipelineSchedule

# Full backward = 2 forwards; a split backward's input-grad part and weight-grad part cost one each.
DEFAULT_COSTS = {F: 1.0, B: 2.0, W: 1.0}


class ScheduleDeadlock(RuntimeError):
    pass


@dataclass
class Timeline:
    schedule: PipelineSchedule
    intervals: List[List[Tuple[float, float, Action]]]  # per stage: (start, end, action) in execution order
    makespan: float
    peak_in_flight: List[int]  # per stage: most microbatch-chunks whose activations are held at once
    op_cost: Dict[str, float] = field(default_factory=dict)
    part_cost: Optional[List[Dict[str, float]]] = None  # per model part, when the parts differ

    @property
    def busy(self) -> List[float]:
        return [sum(e - s for s, e, _ in st) for st in self.intervals]

    def bubble_fraction(self) -> float:
        p = len(self.intervals)
        return 1.0 - sum(self.busy) / (p * self.makespan) if self.makespan else 0.0

    def start_of(self, stage: int, action: Action) -> float:
        for s, _, a in self.intervals[stage]:
            if a == action:
                return s
        raise KeyError(action)


def _op_costs(sched: PipelineSchedule, costs: Optional[Dict[str, float]]) -> Dict[str, float]:
    c = dict(DEFAULT_COSTS)
    c.update(costs or {})
    if sched.split_backward:
        return {F: c[F], B: max(c[B] - c[W], 0.0), W: c[W]}
    return {F: c[F], B: c[B], W: 0.0}


def part_weights(layer_counts: Sequence[int], costs: Optional[StageCosts] = None) -> List[float]:
    """Relative cost of each model part (in model order) in decoder-layer units: its layers (each its own cost
    for MoE), the embedding on part 0 and the output layer and loss on the last (``costs_from_config``); without
    ``costs`` a part weighs its layer count, so an E-only or L-only part costs nothing."""
    c, out, start = costs or StageCosts(), [], 0
    for k, n in enumerate(layer_counts):
        w = sum(c.layer_cost(i) for i in range(start, start + n))
        out.append(w + (c.embedding if k == 0 else 0.0) + (c.head if k == len(layer_counts) - 1 else 0.0))
        start += n
    return out


def _part_op_costs(sched: PipelineSchedule, cost: Dict[str, float],
                   part_costs: Optional[Sequence[Union[float, Dict[str, float]]]]) -> Optional[List[Dict[str, float]]]:
    if part_costs is None:
        return None
    if len(part_costs) != sched.num_parts:
        raise ValueError(f"{len(part_costs)} part costs for a schedule of {sched.num_parts} model parts; give one per "
                         "part, in model order")
    out = []
    for pc in part_costs:
        out.append(_op_costs(sched, pc) if isinstance(pc, dict) else {k: v * float(pc) for k, v in cost.items()})
    return out


def simulate(sched: PipelineSchedule, costs: Optional[Dict[str, float]] = None,
             part_costs: Optional[Sequence[Union[float, Dict[str, float]]]] = None) -> Timeline:
    """``costs``: seconds (or units) per F / full B / W of one chunk; missing keys take ``DEFAULT_COSTS``.
    ``part_costs``: one entry per model part (model order): a float scales ``costs`` for that part (e.g.
    ``part_weights(layer_counts)``), a dict is that part's own F / full B / W costs (measured ones)."""
    cost = _op_costs(sched, costs)
    per_part = _part_op_costs(sched, cost, part_costs)
    p, K = sched.num_stages, sched.num_parts
    end: Dict[Tuple[str, int, int], float] = {}
    pos, clock = [0] * p, [0.0] * p
    held, peak = [0] * p, [0] * p
    frees = W if sched.split_backward else B
    intervals: List[List[Tuple[float, float, Action]]] = [[] for _ in range(p)]
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        moved = False
        for s in range(p):
            acts = sched.actions[s]
            while pos[s] < len(acts):
                a = acts[pos[s]]
                k = sched.part_of(s, a.chunk)
                if a.kind == F:
                    deps = [(F, a.microbatch, k - 1)] if k > 0 else []
                elif a.kind == B:
                    deps = [(F, a.microbatch, k)] + ([(B, a.microbatch, k + 1)] if k < K - 1 else [])
                else:
                    deps = [(B, a.microbatch, k)]
                if any(d not in end for d in deps):
                    break
                start = max([clock[s]] + [end[d] for d in deps])
                finish = start + (per_part[k] if per_part else cost)[a.kind]
                end[(a.kind, a.microbatch, k)] = finish
                clock[s] = finish
                intervals[s].append((start, finish, a))
                held[s] += 1 if a.kind == F else (-1 if a.kind == frees else 0)
                peak[s] = max(peak[s], held[s])
                pos[s] += 1
                remaining -= 1
                moved = True
        if not moved:
            stuck = {s: str(sched.actions[s][pos[s]]) for s in range(p) if pos[s] < len(sched.actions[s])}
            raise ScheduleDeadlock(f"{sched.name}: every stage waits; next actions {stuck}")
    makespan = max(clock) - min((st[0][0] for st in intervals if st), default=0.0)
    return Timeline(sched, intervals, makespan, peak, cost, per_part)


def theoretical_bubble_fraction(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> float:
    """Idle share of the pipeline's time: (p-1)/(m+p-1); interleaved (p-1)/(v*m+p-1); ZB-H1 a third of 1F1B's
    bubble time with F = B = W; Chimera (p-2)/(2m+p-2) for equal forward and backward (Li & Hoefler, Table 2)."""
    p, m, v = num_stages, num_microbatches, num_chunks
    if name == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if name == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    if name == "chimera":
        return max(p - 2, 0) / (2 * m + p - 2)
    return (p - 1) / (m + p - 1)
