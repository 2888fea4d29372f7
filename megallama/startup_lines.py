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
    """The whole model's parameters as ``apply_strategy`` builds it (no tp/pp/ep split): each MoE layer's dense
    MLP replaced by its router, experts and shared expert; LoRA's rank x (in + out) per adapted projection (MoE
    experts are not adapted, a shared expert's projections are)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = cfg.num_query_groups * cfg.head_dim
    moe = strategy.moe_config(cfg.num_layers)
    moe_layers = set(range(cfg.num_layers) if moe is None or moe.layers is None else moe.layers) if moe else set()
    experts = swap = 0
    shared = 0
    if moe is not None:
        shared = moe.shared_expert_intermediate_size or 0
        experts = len(moe_layers) * moe.num_experts * 3 * h * (moe.ffn_hidden_size or f)
        per_layer = moe.num_experts * h + 3 * h * shared + (h if shared and moe.shared_expert_gate else 0)
        swap = len(moe_layers) * (per_layer - 3 * h * f)
    adapters = 0
    lora = strategy.lora_config()
    if lora is not None:
        attn = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h}
        for i in range(cfg.num_layers):
            mlp_f = shared if i in moe_layers else f  # an MoE layer's only Linear MLP is its shared expert
            for t in lora.target_modules:
                adapters += lora.rank * (attn[t] if t in attn else (h + mlp_f if mlp_f else 0))
    dense = cfg.num_params()
    return {"total": dense + swap + experts + adapters, "without_embeddings": cfg.num_params(False) + swap + experts
            + adapters, "experts": experts, "num_experts": moe.num_experts if moe else 0,
            "moe_layers": len(moe_layers), "adapters": adapters}


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
    """(stored, largest gathered unit) of this rank under ZeRO-3: each unit's trainable dense parameters sharded
    over dp x cp, its experts over the expert-data-parallel group (``optimizer/zero3.py``'s buckets, padding
    aside); frozen parameters (a LoRA base) are not sharded."""
    from megallama.optimizer.zero3 import build_units
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)
    ep = ps.get_expert_model_parallel_world_size()
    edp = ps.get_expert_data_parallel_world_size() if ep > 1 else dp
    stored = largest = 0
    for m in chunks:
        params = [p for p in m.parameters() if p.requires_grad]
        stored += sum(p.numel() for p in m.parameters() if not p.requires_grad)
        units, root = build_units(m, params)
        for u in units + ([root] if root is not None else []):
            ex = sum(p.numel() for p in u.params if ep > 1 and getattr(p, "allreduce", True) is False)
            de = sum(p.numel() for p in u.params) - ex
            stored += math.ceil(de / dp) + math.ceil(ex / edp)
            largest = max(largest, de + ex)
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
