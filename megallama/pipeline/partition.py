"""Split decoder layers over pipeline stages and virtual chunks, balanced by cost.

The model is cut into ``num_stages * num_chunks`` consecutive parts (part k = chunk * stages + stage for the
interleaved schedule). Part 0 also runs the embedding and the last part the output head and loss; with a
128K vocabulary the head costs about 2.4 decoder layers of Llama 3 8B, so the last stage should get fewer
layers; a MoE layer costs more than a dense one (its top-k expert MLPs), so sparse layers spread out. We minimise
the most expensive part (every part keeps at least one layer); among the optimal splits the spare layers go to
the later parts, since early stages hold more activations in flight under 1F1B.
``first_stage_num_layers`` / ``last_stage_num_layers`` (Megatron's ``--decoder-first/last-pipeline-num-layers``),
virtual stages and ``--account-for-embedding/loss-in-pipeline-split`` take Megatron-core's own split
(``megatron_split``: the other ranks share the rest evenly, or the flags are refused), so a Megatron launch line
builds the same stages here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from megallama.errors import ConfigError


@dataclass(frozen=True)
class StageCosts:
    """Forward cost per token, in units of one (dense) decoder layer; ``layers``: each layer's own cost where they
    differ (a MoE layer runs top-k expert MLPs and a router)."""
    layer: float = 1.0
    embedding: float = 0.0
    head: float = 0.0
    layers: Optional[Tuple[float, ...]] = None

    def layer_cost(self, i: int) -> float:
        return self.layers[i] if self.layers is not None else self.layer


def costs_from_config(config, seq_length: Optional[int] = None) -> StageCosts:
    """FLOPs-based costs: a layer is 2 x its weights (+ 4 s h of attention scores/values when ``seq_length``
    is given); the head 2 h V plus the softmax; the embedding a row gather (about h). A MoE layer (the config's
    ``moe_layers``) counts its router and top-k expert MLPs (experts of the dense MLP's size)."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    kv = config.num_query_groups * config.head_dim
    attn = 2 * (2 * h * h + 2 * h * kv) + (4 * seq_length * h if seq_length else 0)
    mlp = 2 * 3 * h * f
    layer = attn + mlp
    layers = None
    experts = getattr(config, "num_experts", 0) or 0
    if experts:
        sparse = set(config.moe_layers if config.moe_layers is not None else range(config.num_layers))
        moe = (attn + getattr(config, "moe_router_topk", 2) * mlp + 2 * h * experts) / layer
        layers = tuple(moe if i in sparse else 1.0 for i in range(config.num_layers))
    return StageCosts(1.0, h / layer, (2 * h * v + 5 * v) / layer, layers)


def _split(costs: List[float], extra: List[float]) -> List[int]:
    """Counts of consecutive layers of unequal ``costs`` (MoE among dense) for parts with fixed extras, minimising
    the costliest part (each part >= 1 layer); among the optimal splits the later parts take as many layers as
    they can."""
    n, parts = len(costs), len(extra)

    def fill(bound):  # greedily from the last part; None if the first part cannot stay within bound
        counts, end = [0] * parts, n
        for k in range(parts - 1, -1, -1):
            start, total = end, extra[k]
            while start > k and total + costs[start - 1] <= bound:  # leave a layer for each earlier part
                start -= 1
                total += costs[start]
            if start == end or (k == 0 and start > 0):
                return None
            counts[k], end = end - start, start
        return counts

    lo, hi = 0.0, sum(costs) + max(extra)
    for _ in range(100):  # bisect the bottleneck to float precision, then fill at a hair above it
        mid = (lo + hi) / 2
        if fill(mid) is None:
            lo = mid
        else:
            hi = mid
    return fill(hi * (1 + 1e-12))


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
        fix = " (or raise --num-layers-per-virtual-pipeline-stage)" if num_chunks > 1 else " or raise --num-layers"
        raise ConfigError(f"cannot split {num_layers} layers over {what}: every part needs at least one layer; "
                          f"lower --pipeline-model-parallel-size{fix}")
    if first_stage_num_layers is not None or last_stage_num_layers is not None:
        # Megatron's rule: the pins are whole ranks' layers, the other ranks share the rest evenly
        return parts_of(megatron_split(num_layers, num_stages, num_chunks, first=first_stage_num_layers,
                                       last=last_stage_num_layers), num_layers, num_stages)
    c = costs or StageCosts()
    if c.layers is not None and len(c.layers) != num_layers:
        raise ConfigError(f"{len(c.layers)} layer costs for {num_layers} layers")
    extra = [(c.embedding if k == 0 else 0.0) + (c.head if k == P - 1 else 0.0) for k in range(P)]
    costs = [c.layer_cost(i) for i in range(num_layers)]
    if len(set(costs)) == 1:  # equal layers: the front parts give up the spare ones evenly
        counts = _balanced_counts(num_layers, P, extra, costs[0])
    else:
        counts = _split(costs, extra)
    return parts_of(counts, num_layers, num_stages)


def parts_of(counts, num_layers: int, num_stages: int) -> List[List[int]]:
    """Global layer ids of each part from its decoder-layer count (a part may hold none: the embedding or the loss
    alone, Megatron's "E|" / "|L", or nothing, an empty stage "||" that passes its input on). Checkpoints name layers
    by these global ids, so any split loads any other."""
    counts = [int(c) for c in counts]
    if len(counts) % num_stages or not counts or min(counts) < 0 or sum(counts) != num_layers:
        raise ConfigError(f"layer counts {counts} do not split {num_layers} layers over a multiple of {num_stages} "
                          "pipeline stages; give pp x (virtual stages per rank) counts summing to --num-layers")
    parts, start = [], 0
    for c in counts:
        parts.append(list(range(start, start + c)))
        start += c
    return parts


def megatron_split(num_layers: int, num_stages: int, num_chunks: int = 1, *, first: Optional[int] = None,
                   last: Optional[int] = None, embedding: bool = False, loss: bool = False) -> List[int]:
    """Decoder layers of each part (part k = chunk * stages + rank), as Megatron-core's ``get_num_layers_to_build``.

    ``first`` / ``last`` (--decoder-first/last-pipeline-num-layers) are the layers of the whole first / last
    pipeline *rank*, spread evenly over its ``num_chunks`` virtual stages (so a multiple of them); the other ranks
    share the rest evenly. 8 layers, pp 2, 2 chunks, first 2, last 6: rank 0 holds [1, 1], rank 1 [3, 3], i.e.
    parts [1, 3, 1, 3]. ``embedding`` / ``loss`` (--account-for-embedding/loss-in-pipeline-split) count the
    embedding / the loss as a layer: L + e + l splits evenly over every (rank, chunk), then the model's first part
    builds one decoder layer fewer (the last part too, for the loss), none at all when a part holds one layer:
    126 layers, pp 8, 8 chunks -> 128 / 64 = 2 a part, [1, 2, ..., 2, 1]."""
    p, v, P = num_stages, num_chunks, num_stages * num_chunks
    pins = {k: n for k, n in (("first", first), ("last", last)) if n is not None}
    if pins and (embedding or loss):
        raise ConfigError("--account-for-embedding/loss-in-pipeline-split and --decoder-first/last-pipeline-num-"
                          "layers both place layers; pass one (Megatron refuses the pair too)")
    if embedding or loss:
        e, l = int(embedding), int(loss)
        flags = " and ".join(f"--account-for-{n}-in-pipeline-split" for n, on in (("embedding", e), ("loss", l)) if on)
        total = num_layers + e + l
        if total % P or total // P < 1:
            where = f"{p} pipeline stages" + (f" x {v} virtual stages" if v > 1 else "")
            raise ConfigError(f"{flags}: {num_layers} layers + {e + l} do not split evenly over {where}; change "
                              "--num-layers or the pipeline size (or give --pipeline-model-parallel-layout)")
        counts = [total // P] * P
        counts[0] -= e
        counts[-1] -= l
        return counts
    for name, n in pins.items():
        flag = f"--decoder-{name}-pipeline-num-layers {n}"
        if p == 1:
            raise ConfigError(f"{flag} needs --pipeline-model-parallel-size > 1")
        if n < 1 and v == 1:
            raise ConfigError(f"{flag} must be >= 1")
        if n < 1 or n % v:
            raise ConfigError(f"{flag} must be a positive multiple of the {v} virtual stages per rank (Megatron "
                              "spreads the first/last rank's layers evenly over its virtual stages); change it or "
                              "give --pipeline-model-parallel-layout")
    middle, rest = p - len(pins), num_layers - sum(pins.values())
    if (middle == 0 and rest) or (middle and (rest < middle * v or rest % (middle * v))):
        raise ConfigError(f"pinned first/last stage layers {sorted(pins.values())} leave {rest} layers for "
                          f"{middle} other stages" + (f" x {v} virtual stages" if v > 1 else "") + ", which must split "
                          "evenly (at least one layer each, all layers used; Megatron's rule); change "
                          "--decoder-first/last-pipeline-num-layers or give --pipeline-model-parallel-layout")
    per_rank = [pins["first"] if r == 0 and "first" in pins else pins["last"] if r == p - 1 and "last" in pins
                else rest // middle for r in range(p)]
    return [per_rank[k % p] // v for k in range(P)]


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
                             last_stage_num_layers: Optional[int] = None, layer_counts=None) -> dict:
    """Every layout check in one place, before any process group exists. ``layer_counts``: the split the flags
    resolved to (``args.pipeline_layer_counts``, any uneven virtual stages), taken as given. Returns
    {num_microbatches, num_chunks, parts}."""
    from megallama.pipeline.schedules import check_schedule_args, normalize_schedule_name
    name = normalize_schedule_name(schedule)
    p = pipeline_model_parallel_size
    if layer_counts is not None and p > 1:
        parts = parts_of(layer_counts, num_layers, p)
        v = len(parts) // p
    else:
        v = virtual_chunks(num_layers, p, num_layers_per_virtual_stage) if name == "interleaved" and p > 1 else 1
        parts = partition_layers(num_layers, p, v, first_stage_num_layers=first_stage_num_layers,
                                 last_stage_num_layers=last_stage_num_layers)
    m = None
    if global_batch_size is not None:
        m = num_microbatches(global_batch_size, micro_batch_size, data_parallel_size)
        check_schedule_args(name, p, m, v)
    return {"num_microbatches": m, "num_chunks": v, "parts": parts}
