"""Split decoder layers over pipeline stages and virtual chunks, balanced by cost.

The model is cut into ``num_stages * num_chunks`` consecutive parts (part k = chunk * stages + stage for the
interleaved schedule). Part 0 also runs the embedding and the last part the output head and loss; with a
128K vocabulary the head costs about 2.4 decoder layers of Llama 3 8B, so the last stage should get fewer
layers. We minimise the most expensive part (every part keeps at least one layer); among the optimal splits
the spare layers go to the later parts, since early stages hold more activations in flight under 1F1B.
``first_stage_num_layers`` / ``last_stage_num_layers`` pin the ends (Megatron's
``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``); the rest is balanced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megallama.errors import ConfigError


@dataclass(frozen=True)
class StageCosts:
    """Forward cost per token, in units of one decoder layer."""
    layer: float = 1.0
    embedding: float = 0.0
    head: float = 0.0


def costs_from_config(config, seq_length: Optional[int] = None) -> StageCosts:
    """FLOPs-based costs: a layer is 2 x its weights (+ 4 s h of attention scores/values when ``seq_length``
    is given); the head 2 h V plus the softmax; the embedding a row gather (about h)."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    kv = config.num_query_groups * config.head_dim
    layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + (4 * seq_length * h if seq_length else 0)
    return StageCosts(1.0, h / layer, (2 * h * v + 5 * v) / layer)


def _balanced_counts(num_layers: int, num_parts: int, extra: List[float], layer: float) -> List[int]:
    """Layer counts per part minimising max(count * layer + extra[k]); spare layers to the later parts."""
    eps = 1e-9 * max(1.0, layer)
    cands = sorted({n * layer + e for n in range(1, num_layers + 1) for e in set(extra)})

    def caps(bound):
        return [int((bound - e + eps) // layer) for e in extra]

    lo, hi = 0, len(cands) - 1
    while lo < hi:  # smallest feasible bound
        mid = (lo + hi) // 2
        c = caps(cands[mid])
        if min(c) >= 1 and sum(c) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    counts = caps(cands[lo])
    surplus = sum(counts) - num_layers
    k = 0
    while surplus > 0:  # take the excess from the front parts, one at a time
        if counts[k % num_parts] > 1:
            counts[k % num_parts] -= 1
            surplus -= 1
        k += 1
    return counts


def partition_layers(num_layers: int, num_stages: int, num_chunks: int = 1, *, costs: Optional[StageCosts] = None,
                     first_stage_num_layers: Optional[int] = None,
                     last_stage_num_layers: Optional[int] = None) -> List[List[int]]:
    """Global layer ids of each model part, in model order (``num_stages * num_chunks`` lists)."""
    P = num_stages * num_chunks
    if num_stages < 1 or num_chunks < 1:
        raise ConfigError(f"pipeline stages ({num_stages}) and virtual chunks ({num_chunks}) must be >= 1")
    if num_layers < P:
        what = f"{num_stages} pipeline stages" + (f" x {num_chunks} virtual chunks" if num_chunks > 1 else "")
        raise ConfigError(f"cannot split {num_layers} layers over {what}: every part needs at least one layer; "
                          "lower --pipeline-model-parallel-size (or raise --num-layers-per-virtual-pipeline-stage)")
    pinned = {}
    for name, val, k in (("first", first_stage_num_layers, 0), ("last", last_stage_num_layers, P - 1)):
        if val is None:
            continue
        if num_chunks > 1:
            raise ConfigError(f"--decoder-{name}-pipeline-num-layers cannot be combined with virtual pipeline "
                              "stages; drop one of them")
        if P == 1:
            raise ConfigError(f"--decoder-{name}-pipeline-num-layers needs --pipeline-model-parallel-size > 1")
        if val < 1:
            raise ConfigError(f"--decoder-{name}-pipeline-num-layers must be >= 1, got {val}")
        pinned[k] = val
    free = [k for k in range(P) if k not in pinned]
    rest = num_layers - sum(pinned.values())
    if rest < len(free) or (not free and rest):
        raise ConfigError(f"pinned first/last stage layers {sorted(pinned.values())} leave {rest} layers for "
                          f"{len(free)} other stages (need at least one each, and all {num_layers} used); "
                          "change --decoder-first/last-pipeline-num-layers")
    c = costs or StageCosts()
    counts = dict(pinned)
    if free:
        extra = [(c.embedding if k == 0 else 0.0) + (c.head if k == P - 1 else 0.0) for k in free]
        counts.update(zip(free, _balanced_counts(rest, len(free), extra, c.layer)))
    parts, start = [], 0
    for k in range(P):
        parts.append(list(range(start, start + counts[k])))
        start += counts[k]
    return parts


def virtual_chunks(num_layers: int, num_stages: int, num_layers_per_virtual_stage: Optional[int]) -> int:
    """``v`` from ``--num-layers-per-virtual-pipeline-stage`` (Megatron: L / (p * n), exact)."""
    n = num_layers_per_virtual_stage
    if n is None:
        raise ConfigError("the interleaved schedule needs --num-layers-per-virtual-pipeline-stage (layers per "
                          "model chunk); e.g. 2 with 16 layers on 4 stages gives 2 chunks per stage")
    if n < 1 or num_layers % (num_stages * n):
        raise ConfigError(f"{num_layers} layers do not split into {num_stages} stages x chunks of {n} layers; pick "
                          "--num-layers-per-virtual-pipeline-stage dividing num_layers / pipeline size")
    return num_layers // (num_stages * n)


def num_microbatches(global_batch_size: int, micro_batch_size: int, data_parallel_size: int = 1) -> int:
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ConfigError(f"batch sizes must be >= 1 (global {global_batch_size}, micro {micro_batch_size})")
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by micro batch size "
                          f"{micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}; pick "
                          f"--global-batch-size a multiple of {per_step}")
    return global_batch_size // per_step


def validate_pipeline_config(num_layers: int, pipeline_model_parallel_size: int, schedule: str = "1f1b", *,
                             global_batch_size: Optional[int] = None, micro_batch_size: int = 1,
                             data_parallel_size: int = 1, num_layers_per_virtual_stage: Optional[int] = None,
                             first_stage_num_layers: Optional[int] = None,
                             last_stage_num_layers: Optional[int] = None) -> dict:
    """Every layout check in one place, before any process group exists. Returns {num_microbatches, num_chunks,
    parts}."""
    from megallama.pipeline.schedules import check_schedule_args, normalize_schedule_name
    name = normalize_schedule_name(schedule)
    p = pipeline_model_parallel_size
    v = virtual_chunks(num_layers, p, num_layers_per_virtual_stage) if name == "interleaved" and p > 1 else 1
    parts = partition_layers(num_layers, p, v, first_stage_num_layers=first_stage_num_layers,
                             last_stage_num_layers=last_stage_num_layers)
    m = None
    if global_batch_size is not None:
        m = num_microbatches(global_batch_size, micro_batch_size, data_parallel_size)
        check_schedule_args(name, p, m, v)
    return {"num_microbatches": m, "num_chunks": v, "parts": parts}
