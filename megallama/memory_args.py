"""The memory estimate of a parsed command line: what ``cli train --dry-run``, the loop's ``--dry-run`` and the
Python API print, all from the same resolved flags (precision, microbatches, strategy and experts, ep, schedule,
the MoE options, fp8, --async-save)."""
from __future__ import annotations

from typing import Optional


def estimate_for_args(args, num_gpus: int, num_nodes: int = 1, gpu_memory_gb: Optional[float] = None,
                      recommend: bool = True) -> dict:
    """``estimate_requirements`` for ``arguments.parse_args``'s namespace on ``num_gpus`` x ``num_nodes`` GPUs
    (default GPU memory: --gpu-memory-gb, else the visible GPU's, else 80 GiB). Checks the pipeline split too."""
    from megallama.autoconfig import detect_gpu_memory_gb
    from megallama.memory import estimate_requirements
    from megallama.pipeline.partition import validate_pipeline_config
    pipe = validate_pipeline_config(args.model_config.num_layers, args.pipeline_model_parallel_size,
                                    args.pipeline_schedule, global_batch_size=args.global_batch_size,
                                    micro_batch_size=args.micro_batch_size, data_parallel_size=args.data_parallel_size,
                                    num_layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
                                    first_stage_num_layers=args.decoder_first_pipeline_num_layers,
                                    last_stage_num_layers=args.decoder_last_pipeline_num_layers,
                                    layer_counts=getattr(args, "pipeline_layer_counts", None))
    return estimate_requirements(args.model, model_config=args.model_config, batch_size=args.micro_batch_size,
                                 sequence_length=args.seq_length, num_gpus=num_gpus, num_nodes=num_nodes,
                                 tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                 cp=args.context_parallel_size, ep=args.expert_model_parallel_size,
                                 zero_stage=args.zero_stage, recompute=args.recompute_granularity or "none",
                                 precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                                 sequence_parallel=args.sequence_parallel, pipeline_schedule=args.pipeline_schedule,
                                 num_microbatches=args.num_microbatches, virtual_pipeline_stages=pipe["num_chunks"],
                                 mixed_precision_mode="autocast" if args.params_dtype == "fp32" else "params",
                                 fused_kernels=not args.no_fused_kernels, recompute_method=args.recompute_method,
                                 recompute_num_layers=args.recompute_num_layers,
                                 recompute_modules=getattr(args, "recompute_modules", None),
                                 microbatch_group_size=getattr(args, "microbatch_group_size_per_vp_stage", None),
                                 first_stage_layers=args.decoder_first_pipeline_num_layers,
                                 last_stage_layers=args.decoder_last_pipeline_num_layers,
                                 pipeline_layer_counts=getattr(args, "pipeline_layer_counts", None),
                                 bucket_size=args.bucket_size, overlap_grad_reduce=args.overlap_grad_reduce,
                                 gpu_memory_gb=gpu_memory_gb or args.gpu_memory_gb or detect_gpu_memory_gb(),
                                 device=priced_device(args, planning=True), recommend=recommend,
                                 **feature_kw(args))


def priced_device(args, planning: bool) -> str:
    """Whose code paths an estimate prices ('cpu' or 'cuda'), one rule for the --dry-run table and --auto-configure:
    the --device given; else a plan (``planning``: --dry-run, which may run where no GPU is) is for a GPU run; else
    the device this run will use."""
    device = getattr(args, "device", None)
    if device is not None:
        return "cpu" if str(device).startswith("cpu") else "cuda"
    if planning:
        return "cuda"
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def feature_kw(args) -> dict:
    """``estimate_requirements``'s strategy and feature arguments of a parsed command line (also used by
    --auto-configure and benchmarks/measure_memory.py): LoRA, the MoE options as the built layers resolve them
    (``MoEConfig``), --fp8-format, --async-save, --grad-reduce-in-bf16, --optimizer sgd and, at cp > 1,
    --cp-comm-type (with --hierarchical-context-parallel-sizes)."""
    from megallama.strategies import strategy_from_args
    strategy = strategy_from_args(args)
    kw = strategy.estimate_kw()
    moe = strategy.moe_config(args.model_config.num_layers)
    if moe is not None:
        kw.update(moe_ffn_hidden_size=moe.ffn_hidden_size, moe_expert_capacity_factor=moe.capacity_factor,
                  moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
                  moe_pad_expert_input_to_capacity=moe.pad_to_capacity)
    if getattr(args, "optimizer", None) == "sgd":  # one fp32 state (momentum) instead of Adam's two
        kw["k_bytes"] = sgd_k_bytes(args.bf16 or args.fp16, args.params_dtype, getattr(args, "sgd_momentum", 0.9))
    if getattr(args, "grad_reduce_in_bf16", False):  # the gradient buffer is bf16 (Megatron's grad_reduce_in_fp32 off)
        kw["g_bytes"] = 2
    if getattr(args, "context_parallel_size", 1) > 1:  # checked into one string by argument_checks at cp > 1
        kw.update(cp_comm_type=args.cp_comm_type,
                  hierarchical_context_parallel_sizes=getattr(args, "hierarchical_context_parallel_sizes", None))
    return dict(kw, fp8_format=getattr(args, "fp8", None), async_save=bool(getattr(args, "async_save", False)))


def sgd_k_bytes(half: bool, params_dtype: str, momentum) -> int:
    """K of --optimizer sgd: the fp32 master when the parameters are 16-bit, plus the momentum buffer."""
    from megallama.memory_states import optimizer_states, precision_bytes
    precision = "bf16" if half else "fp32"
    mode = "autocast" if params_dtype == "fp32" else "params"
    return precision_bytes(precision, mode, optimizer_states("sgd", 0.9 if momentum is None else momentum))[2]
