"""Turn a schedule into each stage's program: computes, and between them batches of sends and receives.

Why a plan and not "send when produced, receive when needed": NCCL matches point-to-point messages per peer in
posting order (tags are ignored) and a send blocks its stream until the peer receives, so two stages that post
in different orders corrupt data or hang. Here every message gets one global position: the time its producer
ends in a simulated run of all stages (``simulate.py``), ties broken by (kind, microbatch, part); computes sit
at their start times. Each stage posts its messages in that global order, so both ends of a pair see the same
sequence, and since every compute follows the messages it consumes, the first unfinished item in the global
order can always proceed: no deadlock, whatever the real op times. Consecutive messages form one batch
(``batch_isend_irecv``), the same pairing Megatron hand-writes per schedule.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megallama.pipeline.schedules import B, F, Action, PipelineSchedule, build_schedule
from megallama.pipeline.simulate import simulate

ACT, GRAD = "act", "grad"


@dataclass(frozen=True)
class Message:
    """``act``: output of ``part`` for ``microbatch`` (to part + 1); ``grad``: grad of part's input (to part - 1)."""
    kind: str
    microbatch: int
    part: int
    src: int  # pipeline stage
    dst: int

    def tag(self, num_microbatches: int) -> int:
        """Same number on both ends; gloo matches on it, NCCL ignores it (the order does the matching)."""
        return 1 + 2 * (self.part * num_microbatches + self.microbatch) + (self.kind == GRAD)


@dataclass
class Step:
    ops: List[Tuple[bool, Message]] = field(default_factory=list)  # (is_send, message), posted as one batch
    compute: Optional[Action] = None


def produced_message(sched: PipelineSchedule, stage: int, action: Action) -> Optional[Message]:
    """The message ``action`` produces for another part (None on the model's last/first part, or for W)."""
    k = sched.part_of(stage, action.chunk)
    if action.kind == F and k < sched.num_parts - 1:
        return Message(ACT, action.microbatch, k, stage, sched.location(action.microbatch, k + 1)[0])
    if action.kind == B and k > 0:
        return Message(GRAD, action.microbatch, k, stage, sched.location(action.microbatch, k - 1)[0])
    return None


def consumed_message(sched: PipelineSchedule, stage: int, action: Action) -> Optional[Message]:
    """The message ``action`` needs from another part (input activation for F, output grad for B)."""
    k = sched.part_of(stage, action.chunk)
    if action.kind == F and k > 0:
        return Message(ACT, action.microbatch, k - 1, sched.location(action.microbatch, k - 1)[0], stage)
    if action.kind == B and k < sched.num_parts - 1:
        return Message(GRAD, action.microbatch, k + 1, sched.location(action.microbatch, k + 1)[0], stage)
    return None


def build_stage_program(sched: PipelineSchedule, stage: int) -> List[Step]:
    tl = simulate(sched)
    events = []
    for s, intervals in enumerate(tl.intervals):
        for t0, t1, a in intervals:
            if s == stage:
                events.append(((t0, 1, 0, 0, 0), None, a))
            msg = produced_message(sched, s, a)
            if msg is not None and msg.src != msg.dst and stage in (msg.src, msg.dst):
                key = (t1, 0, msg.kind == GRAD, msg.microbatch, msg.part)
                events.append((key, (msg.src == stage, msg), None))
    events.sort(key=lambda e: e[0])
    program, cur = [], Step()
    for _, op, compute in events:
        if op is not None:
            cur.ops.append(op)
        else:
            cur.compute = compute
            program.append(cur)
            cur = Step()
    if cur.ops:
        program.append(cur)
    return program


@functools.lru_cache(maxsize=256)
def stage_program(name: str, num_stages: int, num_microbatches: int, num_chunks: int, stage: int,
                  forward_only: bool, group_size: Optional[int] = None) -> Tuple[PipelineSchedule, List[Step]]:
    sched = build_schedule(name, num_stages, num_microbatches, num_chunks, group_size)
    if forward_only:
        sched = sched.forward_only()
    return sched, build_stage_program(sched, stage)
