"""Pipeline schedules as pure data: for every stage, the ordered list of compute actions it runs.

An action is ``F`` (forward), ``B`` (backward; input *and* weight grads, unless the schedule splits them) or ``W``
(weight grads, zero-bubble schedules) of one microbatch on one of the stage's model chunks. The model is cut into
``num_parts`` consecutive parts; ``paths[m][k]`` is the (stage, chunk) that runs part ``k`` for microbatch ``m``.
Communication is not listed: it follows from the paths (``plan.py``), so a schedule is only an order of work and
can be checked without any process group (``simulate.py`` runs all stages against each other).

Schedules: GPipe (all forwards, then all backwards), 1F1B (PipeDream-flush, Narayanan et al. 2021), interleaved
1F1B with ``v`` virtual chunks per stage (Megatron's order), Chimera (Li & Hoefler, SC'21: two pipelines in
opposite directions, each stage holding two model chunks that are replicas of each other's stages) and ZB-H1
(Qi et al. 2023: backward split into input grads ``B`` and weight grads ``W`` that fill the 1F1B bubbles; the
runner's W runs the linear layers' weight-gradient GEMMs that B queued, see ``megallama/mpu/weight_grad_store.py``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megallama.errors import ConfigError

F, B, W = "F", "B", "W"
SCHEDULES = ("gpipe", "1f1b", "interleaved", "chimera", "zb-h1")
_ALIASES = {"1f1b": "1f1b", "pipedream": "1f1b", "pipedream-flush": "1f1b", "gpipe": "gpipe", "afab": "gpipe",
            "interleaved": "interleaved", "interleaved-1f1b": "interleaved", "interleaved_1f1b": "interleaved",
            "chimera": "chimera", "zb-h1": "zb-h1", "zbh1": "zb-h1", "zb_h1": "zb-h1", "zero-bubble": "zb-h1"}


@dataclass(frozen=True, order=True)
class Action:
    kind: str  # F, B or W
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class PipelineSchedule:
    name: str
    num_stages: int
    num_microbatches: int
    num_chunks: int  # model chunks held by each stage
    num_parts: int  # consecutive model parts a microbatch passes through
    actions: Tuple[Tuple[Action, ...], ...]  # per stage, in execution order
    paths: Tuple[Tuple[Tuple[int, int], ...], ...]  # per microbatch: (stage, chunk) of part 0..num_parts-1
    split_backward: bool = False

    def part_of(self, stage: int, chunk: int) -> int:
        return chunk_parts(self.name, self.num_stages, stage, self.num_chunks)[chunk]

    def location(self, microbatch: int, part: int) -> Tuple[int, int]:
        return self.paths[microbatch][part]

    def forward_only(self) -> "PipelineSchedule":
        """The same per-stage order of forwards, no backwards (evaluation)."""
        acts = tuple(tuple(a for a in st if a.kind == F) for st in self.actions)
        return PipelineSchedule(self.name, self.num_stages, self.num_microbatches, self.num_chunks, self.num_parts,
                                acts, self.paths, False)


def normalize_schedule_name(name: str) -> str:
    key = str(name).lower().strip()
    if key not in _ALIASES:
        raise ConfigError(f"unknown pipeline schedule '{name}'; use one of {', '.join(SCHEDULES)}")
    return _ALIASES[key]


def chunk_parts(name: str, num_stages: int, stage: int, num_chunks: int = 1) -> List[int]:
    """Model part held by each local chunk of ``stage`` (Megatron's virtual-stage order for interleaved;
    Chimera's second chunk is the mirror stage's part, running the upward pipeline)."""
    name = normalize_schedule_name(name)
    if name == "interleaved":
        return [c * num_stages + stage for c in range(num_chunks)]
    if name == "chimera":
        return [stage, num_stages - 1 - stage]
    return [stage]


def _paths(name: str, p: int, m: int, v: int):
    if name == "interleaved":
        path = tuple((k % p, k // p) for k in range(p * v))
        return tuple(path for _ in range(m))
    if name == "chimera":  # even microbatches go down (stage 0 -> p-1) on chunk 0, odd ones up on chunk 1
        down = tuple((k, 0) for k in range(p))
        up = tuple((p - 1 - k, 1) for k in range(p))
        return tuple(down if i % 2 == 0 else up for i in range(m))
    return tuple(tuple((k, 0) for k in range(p)) for _ in range(m))


# ---------------------------------------------------------------- per-stage generators
def gpipe(num_stages: int, num_microbatches: int, stage: int) -> List[Action]:
    """All forwards, then all backwards: m activations in flight on every stage."""
    return [Action(F, i) for i in range(num_microbatches)] + [Action(B, i) for i in range(num_microbatches)]


def one_f_one_b(num_stages: int, num_microbatches: int, stage: int) -> List[Action]:
    """p-1-stage warm-up forwards, then one forward / one backward, then the cool-down backwards: at most
    p - stage activations in flight."""
    warmup = min(num_stages - stage - 1, num_microbatches)
    acts = [Action(F, i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        acts += [Action(F, warmup + i), Action(B, i)]
    return acts + [Action(B, i) for i in range(num_microbatches - warmup, num_microbatches)]


def schedule_table(num_microbatches: int, num_chunks: int, group_size: int) -> List[Tuple[int, int]]:
    """Megatron's ``get_schedule_table``: (microbatch, chunk) of each forward in order, groups of ``group_size``
    microbatches per chunk, the last group taking what is left (p=2 N=3 m=5 v=2: microbatches 0 1 2 0 1 2 3 4 3 4
    on chunks 0 0 0 1 1 1 0 0 1 1)."""
    m, n, table = num_microbatches, group_size, []
    for lo in range(0, m, n):
        hi = m if lo + n >= m else lo + n
        table += [(i, c) for c in range(num_chunks) for i in range(lo, hi)]
    return table


def interleaved_1f1b(num_stages: int, num_microbatches: int, stage: int, num_chunks: int,
                     group_size: Optional[int] = None) -> List[Action]:
    """Megatron's interleaved order (``get_schedule_table``): microbatches in groups of N (``group_size``,
    --microbatch-group-size-per-virtual-pipeline-stage, default p) run chunk 0, then chunk 1, ...; the last group
    takes what is left; backwards walk the chunks in reverse. Warm-up (p - stage - 1) * 2 + (v - 1) * N forwards.
    The bubble reaches (p-1)/(v*m+p-1) when m is a multiple of N; otherwise the short last group leaves it near
    1F1B's. A larger N holds more microbatches in flight (the warm-up) and sends fewer times between chunks."""
    p, m, v = num_stages, num_microbatches, num_chunks
    n = group_size or p
    table = schedule_table(m, v, n)
    total = m * v
    warmup = min((p - stage - 1) * 2 + (v - 1) * n, total)
    fwd = [Action(F, i, c) for i, c in table]
    bwd = [Action(B, i, v - 1 - c) for i, c in table]
    acts = fwd[:warmup]
    for i in range(total - warmup):
        acts += [fwd[warmup + i], bwd[i]]
    return acts + bwd[total - warmup:]


@functools.lru_cache(maxsize=64)
def _chimera_orders(p: int, m: int) -> Tuple[Tuple[Action, ...], ...]:
    """Greedy list schedule of the two pipelines with F = B = 1: an idle stage runs the ready forward of the
    oldest microbatch while it holds fewer than p activations (1F1B's peak on stage 0), else the ready backward
    of the oldest one. This reaches the paper's bubble (p-2)/(2m+p-2) for even m; with B = 2F it keeps
    about 60% of 1F1B's bubble (``tests/pipeline/test_schedules.py`` checks both)."""
    paths = _paths("chimera", p, m, 2)
    cost = {F: 1, B: 1}
    end: Dict[Tuple[str, int, int], int] = {}  # (kind, mb, part) -> finish time
    nxt = {(s, c, k): 0 for s in range(p) for c in range(2) for k in (F, B)}  # per-chunk cursor (index in its mbs)
    mbs = {(s, c): [i for i in range(m) if paths[i][0][1] == c] for s in range(p) for c in range(2)}
    orders: List[List[Action]] = [[] for _ in range(p)]
    free = [0] * p
    in_flight = [0] * p
    total, done, t = 2 * m * p, 0, 0
    while done < total:
        for s in range(p):
            if free[s] > t:
                continue
            cands = []
            for c in range(2):
                part = chunk_parts("chimera", p, s, 2)[c]
                for kind in (B, F):
                    lst = mbs[(s, c)]
                    j = nxt[(s, c, kind)]
                    if j >= len(lst):
                        continue
                    i = lst[j]
                    if kind == F:
                        ready = part == 0 or end.get((F, i, part - 1), t + 1) <= t
                        ready = ready and in_flight[s] < p
                    else:
                        ready = (F, i, part) in end and end[(F, i, part)] <= t and (
                            part == p - 1 or end.get((B, i, part + 1), t + 1) <= t)
                    if ready:
                        cands.append((0 if kind == F else 1, i, c, kind, part))
            if not cands:
                continue
            _, i, c, kind, part = min(cands)
            nxt[(s, c, kind)] += 1
            end[(kind, i, part)] = t + cost[kind]
            free[s] = t + cost[kind]
            in_flight[s] += 1 if kind == F else -1
            orders[s].append(Action(kind, i, c))
            done += 1
        t += 1
        if t > 10 * total + 10:
            raise RuntimeError("chimera list scheduling made no progress")  # pragma: no cover - a bug, not input
    return tuple(tuple(o) for o in orders)


def chimera(num_stages: int, num_microbatches: int, stage: int) -> List[Action]:
    return list(_chimera_orders(num_stages, num_microbatches)[stage])


@functools.lru_cache(maxsize=64)
def _zb_h1_orders(p: int, m: int) -> Tuple[Tuple[Action, ...], ...]:
    """1F1B's order of F and B (B = input grads only); a stage that would wait runs its oldest pending W instead,
    and a forward waits for a W while p activations are held: every stage's peak is 1F1B's worst (stage 0's),
    the paper's ZB-H1 memory bound. Bubble (p-1)/(3m+p-1) with F = B = W (a third of 1F1B's idle time)."""
    fb = [[a for a in one_f_one_b(p, m, s)] for s in range(p)]
    end: Dict[Tuple[str, int, int], int] = {}
    pos, free = [0] * p, [0] * p
    n_f, n_w = [0] * p, [0] * p
    pending: List[List[int]] = [[] for _ in range(p)]
    orders: List[List[Action]] = [[] for _ in range(p)]
    t, total = 0, 3 * m * p
    while sum(len(o) for o in orders) < total:
        for s in range(p):
            if free[s] > t:
                continue
            act = None
            if pos[s] < len(fb[s]):
                a = fb[s][pos[s]]
                if a.kind == F:
                    ok = (s == 0 or end.get((F, a.microbatch, s - 1), t + 1) <= t) and n_f[s] - n_w[s] < p
                else:
                    ok = s == p - 1 or end.get((B, a.microbatch, s + 1), t + 1) <= t
                if ok:
                    act, pos[s] = a, pos[s] + 1
                    if a.kind == F:
                        n_f[s] += 1
                    else:
                        pending[s].append(a.microbatch)
            if act is None and pending[s]:
                act = Action(W, pending[s].pop(0))
                n_w[s] += 1
            if act is not None:
                end[(act.kind, act.microbatch, s)] = t + 1
                free[s] = t + 1
                orders[s].append(act)
        t += 1
        if t > 10 * total + 10:
            raise RuntimeError("zb-h1 list scheduling made no progress")  # pragma: no cover
    return tuple(tuple(o) for o in orders)


def zero_bubble_h1(num_stages: int, num_microbatches: int, stage: int) -> List[Action]:
    return list(_zb_h1_orders(num_stages, num_microbatches)[stage])


# ---------------------------------------------------------------- the schedule object
def check_schedule_args(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1,
                        group_size: Optional[int] = None) -> str:
    name = normalize_schedule_name(name)
    if num_stages < 1:
        raise ConfigError(f"pipeline size must be >= 1, got {num_stages}")
    if num_microbatches < 1:
        raise ConfigError(f"number of microbatches must be >= 1, got {num_microbatches}; raise --global-batch-size")
    if num_chunks < 1:
        raise ConfigError(f"number of virtual chunks per stage must be >= 1, got {num_chunks}")
    if name != "interleaved" and num_chunks != 1:
        raise ConfigError(f"schedule '{name}' takes one model chunk per stage, got {num_chunks}; use "
                          "--pipeline-schedule interleaved with --num-layers-per-virtual-pipeline-stage")
    if name == "interleaved" and num_stages > 1 and num_microbatches < num_stages:
        raise ConfigError(f"the interleaved schedule needs at least as many microbatches as pipeline stages "
                          f"({num_microbatches} < {num_stages}); raise --global-batch-size or lower "
                          "--micro-batch-size")
    check_microbatch_group(name, num_stages, num_microbatches, group_size)
    return name


def check_microbatch_group(name: str, num_stages: int, num_microbatches: Optional[int],
                           group_size: Optional[int]) -> None:
    """Megatron's checks of --microbatch-group-size-per-virtual-pipeline-stage N (its interleaved schedule's
    ValueError and RuntimeError, as one ConfigError line each): p <= N <= m, and m % N is 0 or >= p. N = p is
    Megatron's default and megallama's order; there a short last group is allowed when it cannot deadlock
    (``build_schedule``). ``num_microbatches`` None: the checks that need no batch size."""
    p, n, m = num_stages, group_size, num_microbatches
    flag = f"--microbatch-group-size-per-virtual-pipeline-stage {n}"
    if n is None or n == p or p == 1:
        return
    if normalize_schedule_name(name) != "interleaved":
        raise ConfigError(f"{flag} groups microbatches per virtual stage of the interleaved schedule, not "
                          f"'{name}'; drop it (or pass {p}) or use --pipeline-schedule interleaved")
    if n < p or (m is not None and n > m):
        raise ConfigError(f"{flag}: the number of contiguous micro-batches in a virtual pipeline stage should range "
                          f"in [PP={p}, M={m if m is not None else 'number of microbatches'}] (Megatron's check); "
                          f"pass a value in that range")
    if m is not None and 0 < m % n < p:
        raise ConfigError(f"{flag}: the remainder of M={m} (the total micro-batches) divided by N={n} should be 0, "
                          f"or larger than or equal to the pipeline-parallel size {p}, but it is {m % n} (Megatron's "
                          f"check: a short last group leaves dependency bubbles); use a number of microbatches that is "
                          f"a multiple of {n} (--global-batch-size / (micro batch x dp)) or another group size")


@functools.lru_cache(maxsize=128)
def build_schedule(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1,
                   group_size: Optional[int] = None) -> PipelineSchedule:
    """Every stage's action list for ``name``; ``num_chunks`` is ``v`` for interleaved (ignored otherwise);
    ``group_size``: interleaved's microbatches per group (N; None: p, Megatron's default)."""
    name = normalize_schedule_name(name)
    v = num_chunks if name == "interleaved" else 1
    name = check_schedule_args(name, num_stages, num_microbatches, v, group_size)
    p, m = num_stages, num_microbatches
    n = group_size if name == "interleaved" and group_size not in (None, p) else None
    gen = {"gpipe": gpipe, "1f1b": one_f_one_b, "chimera": chimera, "zb-h1": zero_bubble_h1}
    if name == "interleaved":
        acts = [interleaved_1f1b(p, m, s, v, n) for s in range(p)]
    else:
        acts = [gen[name](p, m, s) for s in range(p)]
    chunks = 2 if name == "chimera" else v
    parts = p * v
    sched = PipelineSchedule(name, p, m, chunks, parts, tuple(tuple(a) for a in acts), _paths(name, p, m, v),
                             split_backward=name == "zb-h1")
    if name == "interleaved" and m % (n or p):
        # Megatron's warm-up count assumes full groups; a short last group can close a dependency cycle
        # (e.g. p=4, v=3, m=5). Keep the layouts where it does not.
        from megallama.pipeline.simulate import ScheduleDeadlock, simulate
        try:
            simulate(sched)
        except ScheduleDeadlock:
            raise ConfigError(f"the interleaved schedule with {p} stages and {v} chunks per stage cannot run {m} "
                              f"microbatches{f' in groups of {n}' if n else ''}; use a multiple of {n or p} "
                              "(--global-batch-size / (micro batch x dp))")
    return sched


def validate_schedule(sched: PipelineSchedule) -> None:
    """Every (microbatch, part) is forwarded and backwarded (and weight-graded, if split) exactly once, on the
    stage and chunk its path names. Raises AssertionError naming the first violation."""
    kinds = (F, B, W) if sched.split_backward else (F, B)
    seen: Dict[Tuple[str, int, int], int] = {}
    for s, acts in enumerate(sched.actions):
        for a in acts:
            assert a.kind in kinds, f"stage {s}: unexpected action {a}"
            assert 0 <= a.microbatch < sched.num_microbatches and 0 <= a.chunk < sched.num_chunks, f"{s}: {a}"
            k = sched.part_of(s, a.chunk)
            assert sched.paths[a.microbatch][k] == (s, a.chunk), f"stage {s} runs {a} off its path"
            key = (a.kind, a.microbatch, k)
            assert key not in seen, f"stage {s} repeats {a}"
            seen[key] = s
    for i in range(sched.num_microbatches):
        for k in range(sched.num_parts):
            for kind in kinds:
                assert (kind, i, k) in seen, f"{kind} of microbatch {i} part {k} is never run"
