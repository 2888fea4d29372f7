"""Per-GPU memory of a training layout: model states (ZeRO), activations of our Llama layer, the head, buffers.

``estimate_requirements(...)`` is the seed's API (``memory_per_gpu_gb``, a breakdown, ``recommendations``); it runs
without a GPU or a process group. Units: bytes internally, GiB (2**30) in every ``*_gb`` field.

The pieces, one concept a file: model states under ZeRO and the checkpoint's host copy (``memory_states``), one
pipeline stage (``memory_stage``: its parameters, the microbatches its schedule holds, ZeRO buffers), the
activations of our Llama layer (``activation_memory``; fp8 linears there too) and of MoE layers (``moe_memory``:
shared experts, capacity, padding). ZB-H1 (``_zb_h1``) holds 1F1B's whole microbatches plus, per microbatch
between its B and W, the inputs and output gradients of the queued weight-gradient GEMMs. Overhead outside
``torch.cuda.max_memory_allocated``: the CUDA context, NCCL, and allocator fragmentation (stated constants).
Host memory: with ``async_save`` each rank keeps page-locked buffers as large as its checkpoint ('host' fields).
"""
from __future__ import annotations

from typing import Optional

from megallama import activation_memory as am
from megallama.config import ModelConfig, get_model_config
from megallama.errors import ConfigError
from megallama.memory_stage import WORKSPACE_BYTES, _zb_h1, stage_layers, stage_memory  # noqa: F401
from megallama.memory_states import (model_split, model_states_bytes, precision_bytes,  # noqa: F401
                                     split_states_bytes, trainable_split)
from megallama.moe_memory import MoEShape

GiB = 2 ** 30
CUDA_CONTEXT_GB = 0.55  # CUDA context + cuBLAS/cuDNN handles on H100 with torch 2.x (lazy module loading)
NCCL_GB = 0.5  # NCCL communicator buffers per process when any process group spans > 1 GPU
FRAGMENTATION = 0.05  # reserved over allocated by the caching allocator, as a fraction of the peak allocated
FP8_FORMATS = ("e4m3", "hybrid")  # mpu.fp8.FORMATS (the estimator imports no torch; a test checks they agree)
SCHEDULES = ("1f1b", "gpipe", "interleaved", "chimera", "zb-h1")
STRATEGIES = ("standard", "lora", "moe", "hybrid")


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
                          pipeline_layer_counts=None, bucket_size: int = 40_000_000,
                          overlap_grad_reduce: bool = False, optimizer: str = "fused",
                          lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_topk: Optional[int] = None,
                          p_bytes: Optional[float] = None, g_bytes: Optional[float] = None,
                          k_bytes: Optional[float] = None, model_config: Optional[ModelConfig] = None,
                          device: str = "cuda", recommend: bool = True, moe_ffn_hidden_size: Optional[int] = None,
                          moe_shared_expert_intermediate_size: Optional[int] = None,
                          moe_expert_capacity_factor: Optional[float] = None,
                          moe_pad_expert_input_to_capacity: bool = False, moe_shared_expert_gate: bool = False,
                          fp8_format: Optional[str] = None, async_save: bool = False, recompute_modules=None,
                          cp_comm_type: str = "p2p", microbatch_group_size: Optional[int] = None,
                          hierarchical_context_parallel_sizes=None, **aliases) -> dict:
    """Per-GPU memory of training ``model_variant`` with this layout; see the module docstring.

    ``batch_size`` is the micro-batch per GPU; ``num_gpus`` is per node (world = num_gpus * num_nodes, as the
    CLI's --gpus/--nodes). ``mixed_precision_mode`` 'params' (default, as --params-dtype auto: parameters in the
    compute dtype, fp32 masters) or 'autocast' (--params-dtype fp32). Seed aliases: tensor_parallel_size,
    pipeline_parallel_size, micro_batch_size, activation_checkpointing=True (-> recompute 'full'),
    use_flash_attention (always on). ``device`` 'cpu' models the eager CPU code paths (for tests on CPU).
    ``recompute_modules``: Megatron's --recompute-modules under recompute 'selective' (None: megallama's default).
    MoE (Megatron's flags): ``moe_ffn_hidden_size`` per expert, ``moe_shared_expert_intermediate_size``,
    ``moe_expert_capacity_factor`` (negative: none), ``moe_pad_expert_input_to_capacity``, ``moe_shared_expert_gate``
    (its h weights per layer count in ``num_params``). ``fp8_format`` ('hybrid' / 'e4m3', needs bf16): the decoder
    linears in fp8. ``async_save``: pinned host checkpoint buffers.
    ``cp_comm_type`` (Megatron's --cp-comm-type; a2a+p2p with ``hierarchical_context_parallel_sizes``): the
    buffers context-parallel attention holds in backward (cp_memory.py). ``microbatch_group_size``: the
    interleaved schedule's --microbatch-group-size-per-virtual-pipeline-stage (None: pp), its warm-up depth."""
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
           virtual_pipeline_stages, zero_stage, optimizer, sequence_parallel, pipeline_layer_counts)
    moe = _check_features(cfg, tp, ep, strategy, precision, moe_ffn_hidden_size, moe_shared_expert_intermediate_size,
                          moe_expert_capacity_factor, moe_pad_expert_input_to_capacity, fp8_format)
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
    if microbatch_group_size is not None and pp > 1:  # Megatron's checks, as the schedule makes them
        from megallama.pipeline.schedules import check_microbatch_group
        check_microbatch_group(pipeline_schedule, pp, num_microbatches, microbatch_group_size)
    num = am.Numerics.of(precision, mixed_precision_mode, fused_kernels, fp8=fp8_format is not None)
    p, g, k = precision_bytes(precision, mixed_precision_mode)
    pkg = (p if p_bytes is None else p_bytes, g if g_bytes is None else g_bytes, k if k_bytes is None else k_bytes)
    x = am.Shape.of(cfg, batch_size, seq, tp, sequence_parallel, cp)
    layers = stage_layers(cfg, pp, first_stage_layers, pipeline_schedule, last_stage_layers, pipeline_layer_counts)
    v = virtual_pipeline_stages if pipeline_schedule == "interleaved" else 1
    counts = pipeline_layer_counts if pipeline_layer_counts is not None and pp > 1 else None
    stages = {}
    for s in range(pp):  # the split is uneven: any stage can be the fullest
        st = stage_memory(cfg, x, num, layers, s, cfg.num_layers, pp, tp, dp, cp, ep, zero_stage, recompute,
                          pipeline_schedule, num_microbatches, v, strategy, lora_rank, list(lora_targets), pkg, head,
                          recompute_method, recompute_num_layers, bucket_size, overlap_grad_reduce, optimizer,
                          device, moe, recompute_modules=recompute_modules, cp_comm_type=cp_comm_type,
                          microbatch_group_size=microbatch_group_size,
                          hierarchical_cp_sizes=hierarchical_context_parallel_sizes,
                          chunk_layers=max(counts[s::pp]) if counts is not None else None,
                          chunk_counts=counts[s::pp] if counts is not None else None)
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
        "model_variant": cfg.name, "num_params": int(sum(model_split(
            cfg, strategy, lora_rank, lora_targets, moe_ffn_hidden_size, moe_shared_expert_intermediate_size,
            moe_shared_expert_gate))),
        "params_per_gpu": int(st["params"]),
        "memory_per_gpu_gb": total / GiB, "peak_allocated_gb": st["allocated"] / GiB,
        "model_states_gb": (st["weights"] + st["grads"] + st["optimizer"]) / GiB,
        "breakdown_bytes": breakdown, "breakdown_gb": {key: val / GiB for key, val in breakdown.items()},
        "gpu_memory_gb": gpu_memory_gb, "fits": total <= gpu_memory_gb * GiB,
        "headroom_gb": gpu_memory_gb - total / GiB, "peak_phase": st["phase"], "worst_stage": worst,
        "checkpoint_gb_per_gpu": max(d["checkpoint"] for d in stages.values()) / GiB,
        "host_pinned_gb_per_gpu": max(d["checkpoint"] for d in stages.values()) / GiB if async_save else 0.0,
        "phases_gb": {"forward/backward": (st["weights"] + st["grads"] + st["optimizer"] + st["fwd_bwd"]) / GiB,
                      "optimizer step": (st["weights"] + st["grads"] + st["optimizer"] + st["step"]) / GiB},
        "layout": {"world_size": world, "num_gpus": num_gpus, "num_nodes": num_nodes, "tp": tp, "pp": pp, "dp": dp,
                   "cp": cp, "ep": ep, "zero_stage": zero_stage, "micro_batch_size": batch_size,
                   "num_microbatches": num_microbatches, "global_batch_size": global_batch_size,
                   "sequence_length": seq, "sequence_parallel": x.sp, "recompute": recompute,
                   "recompute_modules": None if recompute_modules is None else list(recompute_modules),
                   "precision": precision, "mixed_precision_mode": mixed_precision_mode, "strategy": strategy,
                   "pipeline_schedule": pipeline_schedule if pp > 1 else "none", "in_flight": st["in_flight"],
                   "wgrad_queued": st["wgrad_queued"], "layers_on_worst_stage": st["layers"],
                   "fused_kernels": fused_kernels, "head": head, "fp8_format": fp8_format,
                   "async_save": async_save, "cp_comm_type": cp_comm_type if cp > 1 else None,
                   "moe": None if moe is None else {
                       "ffn_hidden_size": moe.ffn, "shared_expert_intermediate_size": moe.shared or None,
                       "capacity_factor": moe.capacity_factor, "pad_to_capacity": moe.pad,
                       "expert_rows": moe.rows(x.S)}},
        "stages": {s: {"allocated_gb": d["allocated"] / GiB, "phase": d["phase"], "in_flight": d["in_flight"],
                       "wgrad_queued": d["wgrad_queued"], "held_layers": d["held_layers"],
                       "params": int(d["params"])}
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
                    last_stage_layers=last_stage_layers, pipeline_layer_counts=pipeline_layer_counts,
                    bucket_size=bucket_size, overlap_grad_reduce=overlap_grad_reduce, optimizer=optimizer,
                    lora_targets=lora_targets, moe_topk=moe_topk, p_bytes=p_bytes, g_bytes=g_bytes, k_bytes=k_bytes,
                    model_config=model_config, device=device, moe_ffn_hidden_size=moe_ffn_hidden_size,
                    moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
                    moe_expert_capacity_factor=moe_expert_capacity_factor,
                    moe_pad_expert_input_to_capacity=moe_pad_expert_input_to_capacity,
                    moe_shared_expert_gate=moe_shared_expert_gate, fp8_format=fp8_format,
                    async_save=async_save, recompute_modules=recompute_modules, cp_comm_type=cp_comm_type,
                    microbatch_group_size=microbatch_group_size,
                    hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes)
        result["recommendations"] = recommendations(result, args, cfg)
    else:
        result["recommendations"] = []
    return result


def _check(cfg, world, tp, pp, cp, ep, b, seq, recompute, strategy, schedule, v, zero, optimizer, sp, counts=None):
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
    if (world // (tp * pp)) % ep:  # training's grid (validate_grid): expert groups are carved out of dp x cp
        raise ConfigError(f"expert parallel size {ep} must divide data-parallel x context-parallel size "
                          f"{world // (tp * pp)}; choose an ep dividing {world // (tp * pp)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline schedule '{schedule}' is not one of {', '.join(SCHEDULES)}; pick one of those")
    if counts is not None and pp > 1 and (len(counts) != pp * (v if schedule == "interleaved" else 1)
                                          or sum(counts) != cfg.num_layers):
        raise ConfigError(f"pipeline layer counts {list(counts)} are not {pp} x {v} stages of {cfg.num_layers} "
                          "layers; give one count per (virtual) stage")
    if schedule == "interleaved" and pp > 1 and counts is None and (cfg.num_layers % (pp * v)):
        raise ConfigError(f"{cfg.num_layers} layers do not split into pp {pp} x {v} virtual stages; choose "
                          "--num-layers-per-virtual-pipeline-stage dividing the layers per stage")
    if optimizer not in ("fused", "foreach"):
        raise ConfigError(f"optimizer implementation '{optimizer}' is not fused or foreach")
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage {zero} is not one of 0, 1, 2, 3; fix --zero-stage")


def _check_features(cfg, tp, ep, strategy, precision, ffn, shared, cf, pad, fp8) -> Optional[MoEShape]:
    """The MoE layers' shape (None without MoE layers), and the training flags' rules for MoE options and fp8."""
    if fp8 is not None:
        if fp8 not in FP8_FORMATS:
            raise ConfigError(f"fp8 format '{fp8}' is not one of {', '.join(FP8_FORMATS)}; use --fp8-format hybrid")
        if precision != "bf16":
            raise ConfigError(f"--fp8-format {fp8} needs bf16 (the fp8 GEMMs write bf16), got {precision}; use bf16")
        if strategy != "standard" or cfg.num_experts:
            raise ConfigError(f"--fp8-format does not cover MoE experts or LoRA adapters (strategy '{strategy}'); "
                              "drop --fp8-format or use the standard strategy")
    for flag, val in (("--moe-ffn-hidden-size", ffn), ("--moe-shared-expert-intermediate-size", shared)):
        if val is not None and (not isinstance(val, int) or val <= 0):
            raise ConfigError(f"{flag} must be a positive integer, got {val!r}")
        if val is not None and val % tp:
            raise ConfigError(f"{flag} {val} is not divisible by tp {tp}; choose a size divisible by it")
    if cf is not None and cf == 0:
        raise ConfigError("--moe-expert-capacity-factor must be positive (negative: no dropping), got 0")
    if pad and (cf is None or cf < 0):
        raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor; add it or drop "
                          "the padding")
    if strategy not in ("moe", "hybrid") or not cfg.num_experts:
        return None
    return MoEShape(cfg.num_experts, max(1, cfg.num_experts // ep), cfg.moe_router_topk, ffn or cfg.ffn_hidden_size,
                    shared or 0, cf if cf is not None and cf > 0 else None, bool(pad))


def gb(nbytes: float) -> float:
    return nbytes / GiB
