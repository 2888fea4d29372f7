"""``estimate-memory``: per-GPU training memory for a model and layout (no GPU needed); --auto-configure picks it.

  python -m megallama.cli estimate-memory --model llama2_7b --batch-size 16 --gpus 4
  python tools/estimate_memory.py --model llama3_70b --gpus 8 --nodes 8 --tensor-parallel 8 --zero-stage 1 --json
  python tools/estimate_memory.py --model llama3_405b --gpus 8 --nodes 16 --auto-configure --seq-length 8192

Flags use the Megatron names with the seed's aliases; ``--batch-size`` is the micro-batch per GPU; the training
flags' shape overrides (``--num-layers`` ... ``--vocab-size``) estimate another shape of ``--model``. The rest of a
training launch line is read by the training parser (memory_launch_flags: ignored when it leaves memory alone,
priced or refused when not). Exit status 2 with a one-line message on a bad or unknown flag.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from typing import Optional, Sequence

from megallama.errors import ConfigError
from megallama.memory import SCHEDULES


_SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
          "max_position_embeddings")


def _model_config(args):
    """--model with the shape overrides given and the strategy's experts, as the training flags resolve them
    (``strategies.strategy_from_args``: --num-experts alone makes a MoE model, --strategy moe has 8 experts, LoRA
    rank 8); returns (config, the estimator's strategy arguments, the MoE ones as the built layers resolve them)."""
    from megallama.arguments import shape_overrides
    from megallama.config import get_model_config
    from megallama.strategies import strategy_from_args
    strategy = strategy_from_args(args)
    cfg = strategy.model_config(get_model_config(args.model, **shape_overrides(args)))
    kw = strategy.estimate_kw()
    moe = strategy.moe_config(cfg.num_layers)
    if moe is not None:  # memory_args.feature_kw's: --moe-capacity-factor (megallama's) prices as Megatron's does
        kw.update(moe_ffn_hidden_size=moe.ffn_hidden_size, moe_expert_capacity_factor=moe.capacity_factor,
                  moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
                  moe_pad_expert_input_to_capacity=moe.pad_to_capacity)
    return cfg, kw


def build_parser() -> argparse.ArgumentParser:
    from megallama.arg_parser import OneLineErrorParser
    p = OneLineErrorParser(None, description=__doc__.split("\n")[0])
    p.add_argument("--model", "--model-variant", dest="model", default=None,
                   help="default llama3_8b (a Megatron model line without it: training's default, as training)")
    for name in _SHAPE:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="override --model's shape")
    p.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=int, default=None,
                   help="micro-batch per GPU (default 1; searched by --auto-configure unless given)")
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--num-microbatches", type=int, default=None)
    p.add_argument("--seq-length", "--sequence-length", dest="seq_length", type=int, default=None)
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs per node (default: tp x pp x cp over the nodes, i.e. data parallel 1; 1 with "
                        "--auto-configure)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tensor-model-parallel-size", "--tensor-parallel", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--pipeline-parallel", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--context-parallel-size", "--cp", dest="cp", type=int, default=1)
    p.add_argument("--cp-comm-type", choices=["p2p", "a2a", "allgather", "a2a+p2p"], default="p2p",
                   help="context-parallel attention (its backward buffers are priced): ring, Ulysses, K/V all-gather")
    p.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs=2, default=None, metavar=("A2A", "P2P"),
                   help="with --cp-comm-type a2a+p2p")
    p.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=None, help="default 0; searched by --auto-configure unless given")
    p.add_argument("--use-distributed-optimizer", action="store_true", help="Megatron alias of --zero-stage 1")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute-granularity", choices=["none", "selective", "full"], default=None,
                   help="default none; searched by --auto-configure unless given")
    p.add_argument("--activation-checkpointing", action="store_true", help="alias of --recompute-granularity full")
    p.add_argument("--recompute-method", choices=["uniform", "block"], default=None, help="full recompute only")
    p.add_argument("--recompute-num-layers", type=int, default=None, help="full recompute only")
    p.add_argument("--recompute-modules", nargs="*", default=None, help="selective only: Megatron's modules "
                   "(core_attn mlp moe moe_act layernorm shared_experts; default: the norms and the SwiGLU)")
    p.add_argument("--pipeline-schedule", choices=list(SCHEDULES), default=None,
                   help="default 1f1b; interleaved when --num-layers-per-virtual-pipeline-stage is given")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-layout", default=None, help="Megatron's layout string, e.g. "
                   "'E|(tt|)*63,L' (the training flag's rules)")
    p.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", dest="microbatch_group_size_per_vp_stage",
                   type=int, default=None, help="interleaved: microbatches per group (default pp); its warm-up depth")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    p.add_argument("--account-for-embedding-in-pipeline-split", action="store_true")
    p.add_argument("--account-for-loss-in-pipeline-split", action="store_true")
    p.add_argument("--mixed-precision", "--precision", dest="precision", default="bf16",
                   choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--params-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: parameters in the compute dtype with fp32 masters (the loop's default); fp32: fp32 "
                        "parameters with autocast")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="sgd keeps one fp32 state per parameter (momentum) instead of Adam's two")
    p.add_argument("--sgd-momentum", type=float, default=None,
                   help="with --optimizer sgd (default 0.9, as training): 0 keeps no state")
    p.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="as training: a bf16 gradient buffer (2 bytes/param of grads instead of fp32's 4); needs bf16")
    p.add_argument("--no-fused-kernels", action="store_true")
    p.add_argument("--unfused-head", action="store_true", help="logits + cross-entropy instead of the fused head")
    p.add_argument("--strategy", choices=["standard", "lora", "moe", "hybrid"], default="standard")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 8, as training)")
    p.add_argument("--num-experts", type=int, default=None, help="as training: alone it makes a MoE model; "
                   "--strategy moe without it has 8")
    p.add_argument("--moe-router-topk", type=int, default=None, help="experts per token (default 2)")
    p.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="FFN size of each expert (default: dense)")
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="FFN size of the shared expert every token goes through")
    p.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="expert capacity ceil(factor * tokens * topk / experts) (negative: none)")
    p.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="every expert computes exactly its capacity of rows")
    p.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="decoder linears in fp8 (1-byte saved inputs); needs bf16")
    p.add_argument("--async-save", action="store_true", help="report the pinned host buffers of --async-save")
    p.add_argument("--gpu-memory", "--gpu-memory-gb", dest="gpu_memory", type=float, default=80.0,
                   help="GiB per GPU (default 80)")
    p.add_argument("--overlap-grad-reduce", action="store_true")
    p.add_argument("--bucket-size", type=int, default=40_000_000)
    p.add_argument("--auto-configure", action="store_true", help="choose tp/pp/dp/ZeRO/recompute/micro-batch")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def _precision(args) -> str:
    if args.bf16:
        return "bf16"
    if args.fp16:
        return "fp16"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(args.precision, args.precision)


def _pipeline(args, cfg) -> argparse.Namespace:
    """The schedule, virtual chunks and pinned stage sizes as the training flags resolve them (arguments.py's rules:
    --num-layers-per-virtual-pipeline-stage implies interleaved, interleaved needs it, the split is checked)."""
    from megallama.pipeline.megatron_flags import derive_pipeline
    from megallama.pipeline.partition import validate_pipeline_config
    pipe = argparse.Namespace(
        model_config=cfg, pipeline_model_parallel_size=args.pp, pipeline_schedule=args.pipeline_schedule,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        num_virtual_stages_per_pipeline_rank=args.num_virtual_stages_per_pipeline_rank,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        microbatch_group_size_per_vp_stage=args.microbatch_group_size_per_vp_stage,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=args.account_for_loss_in_pipeline_split)
    derive_pipeline(pipe)
    args.pipeline_schedule = pipe.pipeline_schedule
    pipe.num_chunks = validate_pipeline_config(
        cfg.num_layers, args.pp, pipe.pipeline_schedule,
        num_layers_per_virtual_stage=pipe.num_layers_per_virtual_pipeline_stage,
        first_stage_num_layers=pipe.decoder_first_pipeline_num_layers,
        last_stage_num_layers=pipe.decoder_last_pipeline_num_layers,
        layer_counts=getattr(pipe, "pipeline_layer_counts", None))["num_chunks"]
    return pipe


def _fixed_for_auto_configure(args, zero: int, recompute: str) -> dict:
    """What the user fixed stays fixed (ZeRO stage, recompute, schedule, the context-parallel size and its comm
    type), as ``train --auto-configure`` keeps it; tp / pp / ep given with it are a contradiction, not silently
    replaced."""
    sizes = (("--tensor-model-parallel-size", args.tp), ("--pipeline-model-parallel-size", args.pp),
             ("--expert-model-parallel-size", args.ep))
    fixed = [f"{flag} {val}" for flag, val in sizes if val != 1]
    if fixed:
        raise ConfigError(f"--auto-configure chooses the layout itself but {fixed[0]} was given; drop one of them")
    kw = {}
    if args.cp > 1:  # kept, and ep searched over dp x cp (autoconfig_args does the same for train)
        kw.update(context_parallel_size=args.cp, cp_comm_type=args.cp_comm_type,
                  hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes)
    if args.zero_stage is not None or args.use_distributed_optimizer:
        kw["zero_stages"] = (zero,)
    if args.recompute_granularity is not None or args.activation_checkpointing:
        kw["recomputes"] = (recompute,)
    if args.pipeline_schedule not in (None, "interleaved"):  # interleaved: chunks depend on the pp (as train)
        kw["pipeline_schedule"] = args.pipeline_schedule
    return kw


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from megallama.memory import estimate_requirements
    from megallama.memory_launch_flags import check_priced_model, priced_device_kw, read_launch_flags, tokenizer_vocab
    from megallama.optimizer_args import check_sgd_flags
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be a positive integer, got {args.batch_size}")
    launch = read_launch_flags(parser, args, rest, _precision(args))  # the training flags of a pasted launch line
    args.gradient_compression = None
    check_sgd_flags(args)  # the training flags' rules: --sgd-momentum needs --optimizer sgd, in [0, 1)
    if args.gpus is None:
        model_parallel = args.tp * args.pp * args.cp
        args.gpus = 1 if args.auto_configure else max(1, model_parallel // max(1, args.nodes))
    zero = 1 if args.use_distributed_optimizer and not args.zero_stage else args.zero_stage or 0
    recompute = "full" if args.activation_checkpointing else args.recompute_granularity or "none"
    from megallama.argument_checks import check_recompute_flags
    rec = argparse.Namespace(recompute_granularity=recompute, recompute_method=args.recompute_method,
                             recompute_num_layers=args.recompute_num_layers, recompute_modules=args.recompute_modules)
    check_recompute_flags(rec)  # the training flags' rule; fills in uniform / 1
    args.recompute_method, args.recompute_num_layers = rec.recompute_method, rec.recompute_num_layers
    kw = dict(mixed_precision_mode="autocast" if args.params_dtype == "fp32" else "params",
              fused_kernels=not args.no_fused_kernels, head="unfused" if args.unfused_head else "fused",
              moe_ffn_hidden_size=args.moe_ffn_hidden_size, fp8_format=args.fp8_format, async_save=args.async_save,
              moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
              moe_expert_capacity_factor=args.moe_expert_capacity_factor,
              moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity)
    if args.optimizer == "sgd":
        from megallama.memory_args import sgd_k_bytes
        kw["k_bytes"] = sgd_k_bytes(_precision(args) != "fp32", args.params_dtype, args.sgd_momentum)
    if args.grad_reduce_in_bf16:  # the training flag's rules (bf16, bf16 params), then its g bytes (feature_kw's)
        from megallama.optimizer_args import check_optimizer_flags
        check_optimizer_flags(argparse.Namespace(bf16=_precision(args) == "bf16", params_dtype=args.params_dtype,
                                                 grad_reduce_in_bf16=True, gradient_compression=None))
        kw["g_bytes"] = 2
    cfg, strategy = _model_config(args)
    kw.update({k: v for k, v in strategy.items() if k != "strategy"}, **priced_device_kw(args, launch))
    check_priced_model(args, cfg, launch)
    vocab, multiple = tokenizer_vocab(args, launch)
    if args.auto_configure:
        from megallama.autoconfig import choose_layout
        kw.update(_fixed_for_auto_configure(args, zero, recompute), tokenizer_vocab=vocab, vocab_multiple=multiple)
        said = io.StringIO()  # choose_layout prints why nothing fits: kept out of --json's stdout, put in the JSON
        with contextlib.redirect_stdout(said) if args.json else contextlib.nullcontext():
            plan = choose_layout(cfg, args.gpus * args.nodes, args.gpu_memory, args.seq_length,
                                 args.batch_size, args.global_batch_size, _precision(args), strategy["strategy"],
                                 gpus_per_node=args.gpus, **kw)
        if plan is None:
            return {"plan": None, "explanation": said.getvalue().rstrip("\n")} if args.json else {"plan": None}
        return {"plan": {k: v for k, v in plan.items() if k not in ("estimate",)}, "estimate": plan["estimate"]}
    from megallama.autoconfig import vocab_config
    cfg = vocab_config(cfg, args.tp, vocab, multiple)  # the embedding follows a named tokenizer, as build_data's
    pipe = _pipeline(args, cfg)
    est = estimate_requirements(args.model, model_config=cfg, batch_size=args.batch_size or 1,
                                sequence_length=args.seq_length,
                                num_gpus=args.gpus, num_nodes=args.nodes, tp=args.tp, pp=args.pp, cp=args.cp,
                                ep=args.ep, zero_stage=zero, recompute=recompute, precision=_precision(args),
                                strategy=strategy["strategy"], gpu_memory_gb=args.gpu_memory,
                                global_batch_size=args.global_batch_size, num_microbatches=args.num_microbatches,
                                sequence_parallel=args.sequence_parallel, pipeline_schedule=args.pipeline_schedule,
                                virtual_pipeline_stages=pipe.num_chunks, recompute_method=args.recompute_method,
                                first_stage_layers=pipe.decoder_first_pipeline_num_layers,
                                last_stage_layers=pipe.decoder_last_pipeline_num_layers,
                                pipeline_layer_counts=getattr(pipe, "pipeline_layer_counts", None),
                                recompute_num_layers=args.recompute_num_layers, bucket_size=args.bucket_size,
                                recompute_modules=rec.recompute_modules,
                                microbatch_group_size=args.microbatch_group_size_per_vp_stage,
                                overlap_grad_reduce=args.overlap_grad_reduce, cp_comm_type=args.cp_comm_type,
                                hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes, **kw)
    return {"estimate": est, "json": args.json}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megallama.memory_advice import format_table
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        out = run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    as_json = "--json" in argv
    if "plan" in out:
        if as_json:
            print(json.dumps(out, indent=2, default=str))
        elif out["plan"] is not None:
            print(out["plan"]["explanation"])
            print()
            print(format_table(out["estimate"]))
        return 0 if out["plan"] is not None else 1
    if as_json:
        print(json.dumps(out["estimate"], indent=2, default=str))
    else:
        print(format_table(out["estimate"]))
    return 0

