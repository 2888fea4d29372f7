"""The start-up lines that describe the run: the model's size as built (its experts and LoRA adapters included,
not the dense config's), what global rank 0 holds (under ZeRO-3 its shard and what it gathers, not the whole
stage), and the layout with the settings that change what each rank does (sequence parallelism, the pipeline
schedule, recompute, the context-parallel communication). A count that left out 8 experts per layer would mislead
every memory and throughput judgement made from the log."""
from __future__ import annotations

import math

from megallama.mpu import parallel_state as ps


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def built_param_counts(cfg, strategy) -> dict:
    """The whole model's parameters as ``apply_strategy`` builds it (no tp/pp/ep split): the estimator's
    ``memory_states.param_counts`` of the strategy's experts and adapters, so the log and the estimate agree."""
    from megallama.memory_states import param_counts
    return param_counts(strategy.model_config(cfg), **strategy.estimate_kw())


def model_size_text(args, cfg) -> str:
    """'N parameters (M without embeddings; ...)' of the model this run builds."""
    from megallama.strategies import strategy_from_args
    c = built_param_counts(cfg, strategy_from_args(args))
    notes = [f"{human(c['without_embeddings'])} without embeddings"]
    if c["experts"]:
        notes.append(f"{human(c['experts'])} of them in {c['num_experts']} experts x {c['moe_layers']} MoE layer"
                     f"{'s' if c['moe_layers'] > 1 else ''}")
    if c["adapters"]:
        notes.append(f"{human(c['adapters'])} of them LoRA adapters on a frozen base")
    return f"{human(c['total'])} parameters ({'; '.join(notes)})"


def layout_settings(args) -> str:
    """The layout's non-default settings, ', '-joined: sequence parallelism, the schedule (pp > 1), recompute,
    the context-parallel communication (cp > 1)."""
    out = []
    if getattr(args, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
        out.append("sequence parallel")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        out.append(f"schedule {getattr(args, 'pipeline_schedule', None) or '1f1b'}")
    granularity = getattr(args, "recompute_granularity", None)
    if granularity == "full":
        out.append(f"recompute full ({args.recompute_method} {args.recompute_num_layers})")
    elif granularity == "selective":
        mods = getattr(args, "recompute_modules", None)
        out.append("recompute selective" + (f" ({','.join(mods)})" if mods else ""))
    if ps.get_context_parallel_world_size() > 1:
        comm = args.cp_comm_type
        out.append(f"cp comm {comm if isinstance(comm, str) else ','.join(comm)}")
    return ", ".join(out)


def _zero3_shard(chunks) -> tuple:
    """(stored, largest gathered unit) of this rank under ZeRO-3: each unit's dense parameters sharded over
    dp x cp, its experts over the expert-data-parallel group (``optimizer/zero3.py``'s buckets, padding aside),
    frozen ones (a LoRA base) as the trainable ones, in buckets of their own."""
    from megallama.optimizer.zero3 import build_units
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)
    ep = ps.get_expert_model_parallel_world_size()
    edp = ps.get_expert_data_parallel_world_size() if ep > 1 else dp
    stored = largest = 0
    for m in chunks:
        units, root = build_units(m, [p for p in m.parameters() if p.requires_grad],
                                  [p for p in m.parameters() if not p.requires_grad])
        for u in units + ([root] if root is not None else []):
            for kind in (u.params, u.frozen):
                ex = sum(p.numel() for p in kind if ep > 1 and getattr(p, "allreduce", True) is False)
                stored += math.ceil((sum(p.numel() for p in kind) - ex) / dp) + math.ceil(ex / edp)
            de = sum(p.numel() for p in u.params + u.frozen)
            largest = max(largest, de)
    return stored, largest


def holds_line(args, chunks) -> str:
    """What global rank 0 holds, in one line; under ZeRO-3 (dp x cp > 1) its shard and the largest unit it
    gathers, as the whole stage is never resident at once."""
    n_local = sum(p.numel() for m in chunks for p in m.parameters())
    extra = layout_settings(args)
    grid = f"{ps.get_grid_summary()}, zero stage {args.zero_stage}{', ' + extra if extra else ''}"
    if args.zero_stage == 3 and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        stored, largest = _zero3_shard(chunks)
        return (f"global rank 0 stores {human(stored)} parameters (its ZeRO-3 shard of the {human(n_local)} of its "
                f"stage) and gathers one unit (layer, embedding, output layer; at most {human(largest)}) at a time "
                f"({grid})")
    return f"global rank 0 holds {human(n_local)} parameters ({grid})"
