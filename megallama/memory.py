"""Per-GPU memory of a training layout: model states (ZeRO), activations of our Llama layer, the head, buffers.

``estimate_requirements(...)`` is the seed's API (``memory_per_gpu_gb``, a breakdown, ``recommendations``); it runs
without a GPU or a process group. Units: bytes internally, GiB (2**30) in every ``*_gb`` field.

Model states per rank follow ZeRO with p bytes/param, g bytes/grad, K bytes of optimizer state and N = dp*cp:
stage 0 (p+g+K)Ψ, 1 (p+g)Ψ + KΨ/N, 2 pΨ + (g+K)Ψ/N, 3 (p+g+K)Ψ/N. Ours (megallama/optimizer): fp32 grads always
(g = 4); with fp32 params and autocast (--params-dtype fp32) p = 4, K = 8 (Adam m, v; the master is the model);
with bf16/fp16
parameters (mode 'params', the loop's default --params-dtype auto) p = 2, K = 12 (fp32 master + m + v).
Activations: ``activation_memory``; ZB-H1 (``_zb_h1``) holds 1F1B's whole microbatches plus, per microbatch
between its B and W, the inputs and output gradients of the queued weight-gradient GEMMs. Buffers:
ZeRO-2/3 staging buckets, ZeRO-3 gathered units, the optimizer step's temporaries, cuBLAS workspaces. Overhead
outside ``torch.cuda.max_memory_allocated``: the CUDA context, NCCL, and allocator fragmentation (stated constants).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from megallama import activation_memory as am
from megallama.config import ModelConfig, get_model_config
from megallama.errors import ConfigError

GiB = 2 ** 30
CUDA_CONTEXT_GB = 0.55  # CUDA context + cuBLAS/cuDNN handles on H100 with torch 2.x (lazy module loading)
NCCL_GB = 0.5  # NCCL communicator buffers per process when any process group spans > 1 GPU
FRAGMENTATION = 0.05  # reserved over allocated by the caching allocator, as a fraction of the peak allocated
WORKSPACE_BYTES = 64 * 2 ** 20  # cuBLAS / cuBLASLt workspaces, allocated through the caching allocator
SCHEDULES = ("1f1b", "gpipe", "interleaved", "chimera", "zb-h1")
STRATEGIES = ("standard", "lora", "moe", "hybrid")


def model_states_bytes(num_params: float, zero_stage: int, dp: int, p: float, g: float, k: float) -> Dict[str, float]:
    """ZeRO's per-rank model states: weights p*Ψ, grads g*Ψ, optimizer K*Ψ, each divided by N when sharded."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage {zero_stage} is not one of 0, 1, 2, 3; fix --zero-stage")
    n = max(1, dp)
    return {"weights": p * num_params / (n if zero_stage >= 3 else 1),
            "grads": g * num_params / (n if zero_stage >= 2 else 1),
            "optimizer": k * num_params / (n if zero_stage >= 1 else 1)}


def precision_bytes(precision: str, mode: str):
    """(p, g, K) of our training for a precision and mixed-precision mode."""
    if precision == "fp32" or mode == "autocast":
        return 4, 4, 8
    return 2, 4, 12


def trainable_split(strategy: str, dense: float, experts: float, adapters: float):
    """(trainable non-expert, trainable expert, frozen) parameters: LoRA trains the adapters on a frozen base (its
    experts too), hybrid the adapters and the experts, standard and moe everything."""
    if strategy == "lora":
        return adapters, 0, dense + experts
    if strategy == "hybrid":
        return adapters, experts, dense
    return dense, experts, 0


def split_states_bytes(split, zero_stage: int, n: int, ep: int, pkg) -> Dict[str, float]:
    """Model states of a ``trainable_split`` over N = dp*cp ranks: frozen parameters keep weights only (sharded
    by ZeRO-3); experts shard over the expert-data-parallel group (N/ep)."""
    trainable, experts, frozen = split
    st = model_states_bytes(trainable, zero_stage, n, *pkg)
    st["weights"] += pkg[0] * frozen / (n if zero_stage >= 3 else 1)
    if experts:
        ex = model_states_bytes(experts, zero_stage, max(1, n // ep), *pkg)
        st = {key: st[key] + ex[key] for key in st}
    return st


def model_split(cfg: ModelConfig, strategy: str = "standard", lora_rank: int = 8,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """``trainable_split`` of the whole model (no tp/pp), counted as ``_stage`` counts a stage."""
    lp, moe_layers = _layer_params(cfg, 1), 0
    if strategy in ("moe", "hybrid") and cfg.num_experts:
        moe_layers = len(cfg.moe_layers) if cfg.moe_layers else cfg.num_layers
    experts = moe_layers * (cfg.num_experts * lp["mlp"] + cfg.hidden_size * cfg.num_experts)
    adapters = cfg.num_layers * _lora_params(cfg, lora_rank, list(lora_targets), 1) \
        if strategy in ("lora", "hybrid") else 0
    return trainable_split(strategy, cfg.num_params() - moe_layers * lp["mlp"], experts, adapters)


def stage_layers(cfg: ModelConfig, pp: int, first_stage_layers: Optional[int] = None,
                 schedule: str = "1f1b", last_stage_layers: Optional[int] = None) -> List[int]:
    """Decoder layers on each pipeline stage, split as the pipeline builds it (pipeline/partition.py): balanced by
    cost, so the stages with the embedding and the output head get fewer; interleaved cuts equal chunks."""
    if pp == 1:
        return [cfg.num_layers]
    if schedule == "interleaved":
        return [cfg.num_layers // pp] * pp
    from megallama.pipeline.partition import costs_from_config, partition_layers
    parts = partition_layers(cfg.num_layers, pp, costs=costs_from_config(cfg),
                             first_stage_num_layers=first_stage_layers, last_stage_num_layers=last_stage_layers)
    return [len(part) for part in parts]


def _layer_params(cfg: ModelConfig, tp: int) -> Dict[str, int]:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = (2 * h * h + 2 * h * cfg.num_query_groups * d) // tp
    return {"attn": attn, "mlp": 3 * h * cfg.ffn_hidden_size // tp, "norms": 2 * h}


def _lora_params(cfg: ModelConfig, rank: int, targets, tp: int) -> int:
    h, kv = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, cfg.ffn_hidden_size), "up_proj": (h, cfg.ffn_hidden_size),
            "down_proj": (cfg.ffn_hidden_size, h)}
    bad = [t for t in targets if t not in dims]
    if bad:
        raise ConfigError(f"LoRA target modules {bad} unknown; choose from {', '.join(dims)}")
    return sum(rank * (dims[t][0] + dims[t][1] // tp) for t in targets)


def _in_flight(schedule: str, pp: int, stage: int, m: int, v: int) -> int:
    """Microbatches (interleaved: model-chunk forwards) whose activations a stage holds at its peak."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return m
    if schedule == "interleaved":
        return min(m * v, 2 * (pp - stage - 1) + (v - 1) * pp + 1)
    if schedule == "chimera":  # two pipelines in opposite directions: about pp microbatches of one stage's layers
        return min(m, pp)
    return min(pp - stage, m)


def _zb_h1(pp: int, stage: int, m: int, zero: int, strategy: str, inflight: int):
    """(whole, W-queued) microbatches of a ZB-H1 stage at its F/B peak (pipeline/schedules.py ``_zb_h1_orders``:
    1F1B's order, a forward waits while min(pp, m) are not yet W'd): 1F1B's min(pp - stage, m) whole, the rest
    of min(pp, m) queued. A LoRA base is frozen: nothing queues (B frees all). ZeRO-3 splits by re-running the
    backward in W (pipeline/runner.py): graphs live until W, min(pp, m) whole, except on the head's stage."""
    if strategy in ("lora", "hybrid"):
        return inflight, None
    if zero == 3:
        return (inflight if stage == pp - 1 else min(pp, m)), None
    return inflight, min(pp, m) - inflight


def _stage(cfg, x, num, layers, stage, L, pp, tp, dp, cp, ep, zero, recompute, schedule, m, v, strategy,
           lora_rank, lora_targets, pkg, head, method, k_layers, bucket, overlap, optimizer, device="cuda"):
    """Memory of one pipeline stage (pipeline rank ``stage``) in bytes, by category."""
    pre, post = stage == 0, stage == pp - 1
    lp = _layer_params(cfg, tp)
    h, vloc = cfg.hidden_size, cfg.vocab_size // tp
    chunks = 2 if schedule == "chimera" and pp > 1 else 1  # Chimera keeps stages i and pp-1-i
    n_layers = layers[stage] * chunks
    mlp = lp["mlp"]
    expert_params = 0
    if strategy in ("moe", "hybrid") and cfg.num_experts:
        moe_layers = len(cfg.moe_layers) if cfg.moe_layers else L
        frac = min(1.0, moe_layers / L)
        local_experts = max(1, cfg.num_experts // ep)
        expert_params = int(n_layers * frac * (local_experts * mlp + h * cfg.num_experts))
        dense_mlp = int(n_layers * (1 - frac) * mlp)
    else:
        dense_mlp = n_layers * mlp
    dense = n_layers * (lp["attn"] + lp["norms"]) + dense_mlp
    if pre or (chunks == 2):
        dense += vloc * h
    if post or (chunks == 2):
        dense += h + (0 if (cfg.tie_word_embeddings and pp == 1) else vloc * h)
    p, n = pkg[0], dp * cp
    adapters = n_layers * _lora_params(cfg, lora_rank, lora_targets, tp) if strategy in ("lora", "hybrid") else 0
    split = trainable_split(strategy, dense, expert_params, adapters)
    st = split_states_bytes(split, zero, n, ep, pkg)
    local_params = dense + expert_params
    # activations
    inflight, queued = _in_flight(schedule, pp, stage, m, v), None
    if schedule == "zb-h1" and pp > 1:
        inflight, queued = _zb_h1(pp, stage, m, zero, strategy, inflight)
    per_chunk_layers = max(1, layers[stage] // v) if schedule == "interleaved" else \
        layers[stage] if chunks == 2 else n_layers
    moe, n_moe = None, 0
    if strategy in ("moe", "hybrid") and cfg.num_experts:
        moe = am.MoEShape(cfg.num_experts, max(1, cfg.num_experts // ep), cfg.moe_router_topk, cfg.ffn_hidden_size)
        n_moe = round(per_chunk_layers * (len(cfg.moe_layers) / L if cfg.moe_layers else 1.0))
    # ZeRO buffers by phase. Stage 2: one fp32 staging bucket in backward (up to three with overlap). Stage 3:
    # each unit (a layer; the embedding / untied head) is a bucket, gathered (p bytes) just before its use and
    # freed after, the next one prefetched; the root (a tied or shared output weight) stays gathered all step.
    trainable_local = split[0] + split[1]
    extra = {}
    if zero >= 2 and n > 1:
        k = 3 if overlap else 1
        unit = lp["attn"] + lp["mlp"] + lp["norms"]
        if zero == 2:
            staging = 4 * min(trainable_local, k * min(bucket, trainable_local))
            extra = {"head backward": staging, "layer backward": staging}
        else:
            tied_root = cfg.tie_word_embeddings or (post and pp > 1)
            root = vloc * h if tied_root else 0
            head_unit = 0 if (tied_root or not post) else vloc * h
            extra = {"head forward": p * (root + head_unit), "forward end": p * (root + 2 * unit),
                     "head backward": p * (root + head_unit) + 4 * head_unit,
                     "layer backward": p * (root + 2 * unit) + 4 * k * unit}
    act = am.stage_activation_peak(x, num, per_chunk_layers, recompute, inflight, pre, post, head, method, k_layers,
                                   others_hold_ends=schedule not in ("interleaved", "chimera"), extra=extra, moe=moe,
                                   moe_layers=n_moe, device=device,
                                   head_trainable=strategy not in ("lora", "hybrid"), wgrad_queued=queued)
    if strategy in ("lora", "hybrid") and recompute != "full":
        # + the rank-r intermediates; - what frozen weights need not keep: a frozen down_proj's input (the SwiGLU
        # product; MoE layers' experts train under hybrid), the input of a frozen gate/up or q/k/v GEMM (kept
        # only for weight gradients unless an adapter reads it), on the first stage the first layer's input norm
        dense_layers = n_layers - n_moe * (n_layers // max(1, per_chunk_layers))
        lin = (num.e if num.cast else num.r) * x.Sn * h
        delta = n_layers * len(lora_targets) * num.e * x.S * lora_rank - \
            (0 if "down_proj" in lora_targets else dense_layers * num.e * x.S * (cfg.ffn_hidden_size // tp)) - \
            (0 if {"gate_proj", "up_proj"} & set(lora_targets) else dense_layers * lin) - \
            (0 if {"q_proj", "k_proj", "v_proj"} & set(lora_targets) else n_layers * lin)
        first = 0  # the first layer's input needs no gradient: its input norm keeps nothing
        if pre:
            norm = am.norm_saved(x, num) if recompute == "none" else num.r * x.Sn * h  # selective: the input only
            first = norm
            if not {"q_proj", "k_proj", "v_proj"} & set(lora_targets):  # nor does its attention (q, k, v, lse) ...
                first += am.layer_saved(x, num)["attention"] - \
                    (num.e * x.S * (h // tp) if "o_proj" in lora_targets else 0)  # ... but o_proj's adapter's input
                first += num.e * (x.qkv_params if num.cast else 0)  # no q/k/v input grad: their casts are not kept
                if "o_proj" not in lora_targets:  # nothing in its attention trains: the MLP's input norm keeps nothing
                    first += norm + num.e * (h * h // tp if num.cast else 0)
        delta = delta * inflight - first
        act["activations"] += delta
        act["total"] += delta
    buffers = WORKSPACE_BYTES + act["buffers"]
    step = WORKSPACE_BYTES
    if optimizer == "foreach":  # torch's foreach AdamW: one fp32 temporary as large as the params it updates
        step += 4 * trainable_local / (n if zero >= 1 else 1)
    out = {"weights": st["weights"], "grads": st["grads"], "optimizer": st["optimizer"],
           "activations": act["activations"], "logits": act["logits"], "weight_casts": act["weight_casts"],
           "buffers": buffers, "phase": act["phase"], "in_flight": inflight, "wgrad_queued": queued or 0,
           "params": local_params,
           "layers": n_layers, "fwd_bwd": act["total"] + WORKSPACE_BYTES, "step": step}
    if step > out["fwd_bwd"]:  # the optimizer step, after the activations are freed, is the peak
        out.update(activations=0, logits=0, weight_casts=0, buffers=step, phase="optimizer step")
    return out


def _resolve_config(model_variant, model_config, num_experts, moe_topk):
    cfg = model_config if model_config is not None else get_model_config(model_variant)
    if num_experts:
        cfg = cfg.replace(num_experts=num_experts, moe_router_topk=moe_topk or cfg.moe_router_topk)
    return cfg


def estimate_requirements(model_variant: str = "llama3_8b", batch_size: int = 1, sequence_length: Optional[int] = None,
                          num_gpus: int = 1, num_nodes: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1,
                          zero_stage: int = 0, recompute: str = "none", precision: str = "bf16",
                          strategy: str = "standard", lora_rank: int = 8, num_experts: Optional[int] = None,
                          gpu_memory_gb: float = 80.0, global_batch_size: Optional[int] = None,
                          num_microbatches: Optional[int] = None, sequence_parallel: bool = False,
                          pipeline_schedule: str = "1f1b", virtual_pipeline_stages: int = 1,
                          mixed_precision_mode: str = "params", fused_kernels: bool = True, head: str = "fused",
                          recompute_method: str = "uniform", recompute_num_layers: int = 1,
                          first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None,
                          bucket_size: int = 40_000_000,
                          overlap_grad_reduce: bool = False, optimizer: str = "fused",
                          lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_topk: Optional[int] = None,
                          p_bytes: Optional[float] = None, g_bytes: Optional[float] = None,
                          k_bytes: Optional[float] = None, model_config: Optional[ModelConfig] = None,
                          device: str = "cuda", recommend: bool = True, **aliases) -> dict:
    """Per-GPU memory of training ``model_variant`` with this layout; see the module docstring.

    ``batch_size`` is the micro-batch per GPU; ``num_gpus`` is per node (world = num_gpus * num_nodes, as the
    CLI's --gpus/--nodes). ``mixed_precision_mode`` 'params' (default, as --params-dtype auto: parameters in the
    compute dtype, fp32 masters) or 'autocast' (--params-dtype fp32). Seed aliases: tensor_parallel_size,
    pipeline_parallel_size, micro_batch_size, activation_checkpointing=True (-> recompute 'full'),
    use_flash_attention (always on). ``device`` 'cpu' models the eager CPU code paths (for tests on CPU)."""
    for name, target in (("tensor_parallel_size", "tp"), ("pipeline_parallel_size", "pp"),
                         ("micro_batch_size", "batch_size"), ("context_parallel_size", "cp"),
                         ("expert_parallel_size", "ep")):
        if name in aliases:
            val = aliases.pop(name)
            if target == "tp":
                tp = val
            elif target == "pp":
                pp = val
            elif target == "cp":
                cp = val
            elif target == "ep":
                ep = val
            else:
                batch_size = val
    if aliases.pop("activation_checkpointing", False):
        recompute = "full"
    aliases.pop("use_flash_attention", None)
    if aliases:
        raise ConfigError(f"estimate_requirements got unknown arguments {sorted(aliases)}; see its docstring")
    cfg = _resolve_config(model_variant, model_config, num_experts, moe_topk)
    seq = sequence_length or min(cfg.max_position_embeddings, 2048)
    world = num_gpus * num_nodes
    _check(cfg, world, tp, pp, cp, ep, batch_size, seq, recompute, strategy, pipeline_schedule,
           virtual_pipeline_stages, zero_stage, optimizer, sequence_parallel)
    dp = world // (tp * pp * cp)
    if num_microbatches is None:
        if global_batch_size is not None:
            if global_batch_size % (batch_size * dp):
                raise ConfigError(f"global batch {global_batch_size} is not divisible by micro-batch {batch_size} x "
                                  f"dp {dp}; make it a multiple of {batch_size * dp}")
            num_microbatches = global_batch_size // (batch_size * dp)
        else:
            num_microbatches = 1 if pp == 1 else 4 * pp
    global_batch_size = batch_size * dp * num_microbatches
    num = am.Numerics.of(precision, mixed_precision_mode, fused_kernels)
    p, g, k = precision_bytes(precision, mixed_precision_mode)
    pkg = (p if p_bytes is None else p_bytes, g if g_bytes is None else g_bytes, k if k_bytes is None else k_bytes)
    x = am.Shape.of(cfg, batch_size, seq, tp, sequence_parallel, cp)
    layers = stage_layers(cfg, pp, first_stage_layers, pipeline_schedule, last_stage_layers)
    v = virtual_pipeline_stages if pipeline_schedule == "interleaved" else 1
    stages = {}
    for s in range(pp):  # the split is uneven: any stage can be the fullest
        st = _stage(cfg, x, num, layers, s, cfg.num_layers, pp, tp, dp, cp, ep, zero_stage, recompute,
                    pipeline_schedule, num_microbatches, v, strategy, lora_rank, list(lora_targets), pkg, head,
                    recompute_method, recompute_num_layers, bucket_size, overlap_grad_reduce, optimizer, device)
        keys = ("weights", "grads", "optimizer", "activations", "logits", "weight_casts", "buffers")
        st["allocated"] = sum(st[key] for key in keys)
        stages[s] = st
    worst = max(stages, key=lambda s: stages[s]["allocated"])
    st = stages[worst]
    overhead = CUDA_CONTEXT_GB * GiB + (NCCL_GB * GiB if world > 1 else 0) + FRAGMENTATION * st["allocated"]
    total = st["allocated"] + overhead
    cats = ("weights", "grads", "optimizer", "activations", "logits", "weight_casts", "buffers")
    breakdown = {key: int(st[key]) for key in cats}
    breakdown["overhead"] = int(overhead)
    result = {
        "model_variant": cfg.name, "num_params": int(sum(model_split(cfg, strategy, lora_rank, lora_targets))),
        "params_per_gpu": int(st["params"]),
        "memory_per_gpu_gb": total / GiB, "peak_allocated_gb": st["allocated"] / GiB,
        "model_states_gb": (st["weights"] + st["grads"] + st["optimizer"]) / GiB,
        "breakdown_bytes": breakdown, "breakdown_gb": {key: val / GiB for key, val in breakdown.items()},
        "gpu_memory_gb": gpu_memory_gb, "fits": total <= gpu_memory_gb * GiB,
        "headroom_gb": gpu_memory_gb - total / GiB, "peak_phase": st["phase"], "worst_stage": worst,
        "phases_gb": {"forward/backward": (st["weights"] + st["grads"] + st["optimizer"] + st["fwd_bwd"]) / GiB,
                      "optimizer step": (st["weights"] + st["grads"] + st["optimizer"] + st["step"]) / GiB},
        "layout": {"world_size": world, "num_gpus": num_gpus, "num_nodes": num_nodes, "tp": tp, "pp": pp, "dp": dp,
                   "cp": cp, "ep": ep, "zero_stage": zero_stage, "micro_batch_size": batch_size,
                   "num_microbatches": num_microbatches, "global_batch_size": global_batch_size,
                   "sequence_length": seq, "sequence_parallel": x.sp, "recompute": recompute,
                   "precision": precision, "mixed_precision_mode": mixed_precision_mode, "strategy": strategy,
                   "pipeline_schedule": pipeline_schedule if pp > 1 else "none", "in_flight": st["in_flight"],
                   "wgrad_queued": st["wgrad_queued"], "layers_on_worst_stage": st["layers"],
                   "fused_kernels": fused_kernels, "head": head},
        "stages": {s: {"allocated_gb": d["allocated"] / GiB, "phase": d["phase"], "in_flight": d["in_flight"],
                       "wgrad_queued": d["wgrad_queued"]}
                   for s, d in stages.items()},
    }
    if recommend:
        from megallama.memory_advice import recommendations
        args = dict(model_variant=model_variant, batch_size=batch_size, sequence_length=seq, num_gpus=num_gpus,
                    num_nodes=num_nodes, tp=tp, pp=pp, cp=cp, ep=ep, zero_stage=zero_stage, recompute=recompute,
                    precision=precision, strategy=strategy, lora_rank=lora_rank, num_experts=num_experts,
                    gpu_memory_gb=gpu_memory_gb, num_microbatches=num_microbatches,
                    sequence_parallel=sequence_parallel, pipeline_schedule=pipeline_schedule,
                    virtual_pipeline_stages=virtual_pipeline_stages, mixed_precision_mode=mixed_precision_mode,
                    fused_kernels=fused_kernels, head=head, recompute_method=recompute_method,
                    recompute_num_layers=recompute_num_layers, first_stage_layers=first_stage_layers,
                    last_stage_layers=last_stage_layers,
                    bucket_size=bucket_size, overlap_grad_reduce=overlap_grad_reduce, optimizer=optimizer,
                    lora_targets=lora_targets, moe_topk=moe_topk, p_bytes=p_bytes, g_bytes=g_bytes, k_bytes=k_bytes,
                    model_config=model_config, device=device)
        result["recommendations"] = recommendations(result, args, cfg)
    else:
        result["recommendations"] = []
    return result


def _check(cfg, world, tp, pp, cp, ep, b, seq, recompute, strategy, schedule, v, zero, optimizer, sp):
    for name, val in (("--gpus x --nodes", world), ("--tensor-model-parallel-size", tp),
                      ("--pipeline-model-parallel-size", pp), ("--context-parallel-size", cp),
                      ("--expert-model-parallel-size", ep), ("--micro-batch-size", b), ("--seq-length", seq)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{name} must be a positive integer, got {val!r}")
    if world % (tp * pp * cp):
        raise ConfigError(f"{world} GPUs are not divisible by tp*pp*cp = {tp}*{pp}*{cp}; change the GPU count or "
                          "the parallel sizes")
    for what, n in (("attention heads", cfg.num_attention_heads), ("query groups (kv heads)", cfg.num_query_groups),
                    ("vocabulary size", cfg.vocab_size), ("FFN size", cfg.ffn_hidden_size)):
        if n % tp:
            raise ConfigError(f"{cfg.name}'s {n} {what} are not divisible by tp {tp}; choose a tp dividing it")
    if pp > cfg.num_layers:
        raise ConfigError(f"pp {pp} exceeds {cfg.name}'s {cfg.num_layers} layers; choose pp <= {cfg.num_layers}")
    if seq % cp:
        raise ConfigError(f"sequence length {seq} is not divisible by cp {cp}; pick a multiple of {cp}")
    if sp and tp > 1 and (b * seq // cp) % tp:
        raise ConfigError(f"sequence parallelism splits {b * seq // cp} tokens over tp {tp}; pick a sequence "
                          f"length that is a multiple of {tp}")
    if recompute not in am.RECOMPUTE:
        raise ConfigError(f"recompute '{recompute}' is not one of {', '.join(am.RECOMPUTE)}; pick one of those")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy '{strategy}' is not one of {', '.join(STRATEGIES)}; pick one of those")
    if strategy in ("moe",) and not cfg.num_experts:
        raise ConfigError("strategy 'moe' needs num_experts (e.g. 8); pass --num-experts")
    if cfg.num_experts and cfg.num_experts % ep:
        raise ConfigError(f"{cfg.num_experts} experts are not divisible by ep {ep}; choose ep dividing it")
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline schedule '{schedule}' is not one of {', '.join(SCHEDULES)}; pick one of those")
    if schedule == "interleaved" and pp > 1 and (cfg.num_layers % (pp * v)):
        raise ConfigError(f"{cfg.num_layers} layers do not split into pp {pp} x {v} virtual stages; choose "
                          "--num-layers-per-virtual-pipeline-stage dividing the layers per stage")
    if optimizer not in ("fused", "foreach"):
        raise ConfigError(f"optimizer implementation '{optimizer}' is not fused or foreach")
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage {zero} is not one of 0, 1, 2, 3; fix --zero-stage")


def gb(nbytes: float) -> float:
    return nbytes / GiB
