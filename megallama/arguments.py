"""Command-line arguments: Megatron-LM names, plus the seed README's short aliases.

``parse_args(argv)`` returns an ``argparse.Namespace`` with the model shape resolved from ``--model`` and any
overrides (``args.model_config``), and the derived batch sizes checked. Every user mistake raises ConfigError.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megallama.arg_parser import OneLineErrorParser
from megallama.batch_rampup import setup_rampup
from megallama.checkpoint_args import add_async_save_args, check_checkpoint_flags, checkpoint_seq_length
from megallama.config import get_model_config, list_models
from megallama.errors import ConfigError
from megallama.fp8_args import add_fp8_args, check_fp8_flags
from megallama.lr_scheduler import DECAY_STYLES, WSD_DECAY_STYLES, check_schedule_flags
from megallama.megatron_compat import add_megatron_args, apply_shape_flags, check_model_flags, samples_to_iters
from megallama.megatron_defaults import apply_megatron_defaults, given_dests
from megallama.megatron_loop_flags import add_loop_args, check_loop_flags
from megallama.moe_args import add_moe_args, moe_layer_freq_type
from megallama.optimizer_args import add_optimizer_args
from megallama.pipeline.megatron_flags import add_pipeline_args, check_pipeline_microbatches, derive_pipeline
from megallama.progress_log import add_progress_log_args
from megallama.timers import add_timing_args


def _add_model(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-variant", dest="model", default="tiny_llama3_50m",
                   help=f"named variant: {', '.join(list_models())}")
    for flag, typ in (("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
                      ("--num-attention-heads", int), ("--num-query-groups", int),
                      ("--max-position-embeddings", int), ("--vocab-size", int), ("--rope-theta", float),
                      ("--norm-epsilon", float), ("--init-method-std", float)):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron compatibility; GQA "
                   "is on whenever --num-query-groups < --num-attention-heads")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--seq-length", "--sequence-length", dest="seq_length", type=int, default=None)
    g.add_argument("--no-fused-kernels", action="store_true", help="use the PyTorch reference ops")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="weight-gradient GEMMs write a 16-bit gradient that the DDP hook adds into main_grad, "
                        "instead of accumulating into the fp32 main_grad themselves (Megatron's flag)")
    g.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (regional compilation)")
    g.add_argument("--profile-step", type=int, default=None, help="run this iteration (1-based) under "
                   "torch.profiler and print its top-10 kernels with their share of the step time")


def _add_training(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--batch-size", dest="batch_size_alias", type=int, default=None,
                   help="seed alias: the global batch size (micro-batch = min(batch, 4) unless given)")
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None, help="seed alias: train this many passes over the data")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=None, help="default lr/10")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="default 10%% of train iters, at most 2000")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the LR warmup starts from")
    g.add_argument("--lr-decay-style", choices=list(DECAY_STYLES), default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", choices=list(WSD_DECAY_STYLES), default="exponential",
                   help="WSD: the shape of the final anneal")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: the last iterations (of --lr-decay-iters) that anneal to --min-lr")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, use this run's LR schedule (--lr, --min-lr, warmup, decay) over the checkpoint's")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule whatever this run's flags say")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--mixed-precision", choices=["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"],
                   default=None, help="seed alias of --bf16/--fp16")
    g.add_argument("--params-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="model parameter storage; auto = the --bf16/--fp16 compute dtype (fp32 master weights and "
                        "Adam states live in the optimizer either way)")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: the dynamic scale's floor")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="fp16: clean steps before the dynamic scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflowing steps before the scale halves")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None, help="selective: core_attn moe_act layernorm mlp "
                   "moe shared_experts (default: the norms and the dense SwiGLU; megallama/model/recompute.py)")
    g.add_argument("--activation-checkpointing", action="store_true", help="seed alias of --recompute-granularity full")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many consecutive iterations skipped for NaN/inf")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--auto-configure", action="store_true", help="choose tp/pp/dp, ZeRO stage, recompute and "
                   "micro-batch for the model, world size and GPU memory (megallama/autoconfig.py); explained on "
                   "rank 0. With --dry-run and --gpus/--nodes it plans from one process and exits")
    g.add_argument("--gpu-memory-gb", type=float, default=None, help="GiB per GPU for --auto-configure (default: "
                   "the visible GPU's, else 80)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--strategy", choices=["standard", "moe", "lora", "hybrid"], default="standard",
                   help="moe: sparse MLPs (--num-experts ...); lora: adapters on a frozen base; hybrid: both")
    g.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 8)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (update = alpha/r B A x; "
                   "default 2r)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-target-modules", nargs="+", default=None, help="q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj (comma or space separated) or 'all' (default q_proj,k_proj,v_proj,o_proj)")
    g.add_argument("--pretrained-checkpoint", default=None, help="fine-tuning: load these weights (a megallama "
                   "checkpoint of any layout) before the strategy adds adapters/experts; --load resumes this run")
    g.add_argument("--save-adapter", default=None, help="LoRA: write the adapters (full tensors, PEFT names) "
                   "here at the end of training")
    g.add_argument("--load-adapter", default=None, metavar="DIR", help="LoRA: start the adapters from this PEFT "
                   "folder (adapter_config.json + adapter_model.safetensors/.bin, as --save-adapter or HF peft write "
                   "it) instead of a fresh init, on the base model loaded as usual (--pretrained-checkpoint). "
                   "--lora-rank/--lora-alpha/--lora-target-modules left unset take the adapter's; given ones must "
                   "match it. A resume wins: when --load holds this run's checkpoint, its adapters (trained further "
                   "than the folder's) are loaded and the folder is not read")
    g.add_argument("--sft-packing", action="store_true", help="chat data: pack several conversations per sample "
                   "(document-masked attention, positions restart) instead of one padded conversation")
    g.add_argument("--chat-template", dest="chat_format", choices=["auto", "llama3", "llama2"], default="auto",
                   help="chat data: Meta's Llama 3 or Llama 2 chat format (auto: the format the tokenizer ships or "
                   "implies, else llama3; a resume: the run's). Saved with the checkpoint for generate --chat and the "
                   "HF export")


def _add_parallel(p):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", "--tensor-parallel", dest="tensor_model_parallel_size", type=int,
                   default=1)
    g.add_argument("--pipeline-model-parallel-size", "--pipeline-parallel", dest="pipeline_model_parallel_size",
                   type=int, default=1)
    g.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b", "interleaved", "chimera", "zb-h1"],
                   default=None, help="default 1f1b, or interleaved with --num-layers-per-virtual-pipeline-stage")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per model chunk: implies --pipeline-schedule interleaved (Megatron)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", nargs="+", choices=["p2p", "a2a", "allgather", "a2a+p2p"], default="p2p",
                   help="context parallelism: p2p = ring attention, a2a = Ulysses all-to-all (heads/tp %% cp == 0), "
                   "allgather = K/V all-gather, a2a+p2p = a2a inside --hierarchical-context-parallel-sizes groups, "
                   "p2p across; one type for all layers")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None)
    g.add_argument("--use-distributed-optimizer", action="store_true", help="Megatron alias of --zero-stage 1")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="start each gradient bucket's reduction "
                   "(all-reduce, or reduce-scatter at ZeRO >= 1) as soon as backward completes it")
    g.add_argument("--overlap-param-gather", action="store_true", help="ZeRO >= 1: all-gather the updated "
                   "parameters asynchronously (ZeRO-3: prefetch the next unit's); needs the distributed optimizer")
    g.add_argument("--bucket-size", type=int, default=40_000_000)
    g.add_argument("--gpus", type=int, default=None, help="seed alias: expected world size (checked against torchrun)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.01)
    g.add_argument("--moe-layer-freq", type=moe_layer_freq_type, default=1, help="N or a 0/1 pattern ([0]*1+[1]*27)")
    g.add_argument("--moe-layers", default=None, help="comma list of 0-based sparse layer indices (overrides "
                   "--moe-layer-freq)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-capacity-factor", type=float, default=None, help="drop tokens beyond this multiple "
                   "of an expert's even share (default: no dropping)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="per-expert FFN size (default "
                   "--ffn-hidden-size)")
    g.add_argument("--moe-upcycle", action="store_true", help="start every expert as a copy of the dense MLP "
                   "(default with --pretrained-checkpoint)")
    g.add_argument("--gradient-compression", nargs="?", const="powersgd", default="none",
                   choices=["none", "powersgd", "onebit", "topk"], help="compress the data-parallel gradient "
                   "all-reduce (error feedback; ZeRO 0/1): PowerSGD low rank, 1-bit Adam, or top-k")
    g.add_argument("--gradient-compression-rank", type=int, default=4, help="PowerSGD rank")
    g.add_argument("--topk-ratio", type=float, default=0.01, help="top-k: fraction of gradient entries sent")
    g.add_argument("--compression-warmup-steps", type=int, default=None, help="exact (uncompressed) steps "
                   "first; 1-bit Adam estimates its variance in them (default: 10%% of --train-iters)")
    g.add_argument("--no-save-compression-state", action="store_true", help="checkpoints leave out the "
                   "compressor's per-rank error memories (4 bytes per local parameter per dp rank, about 12 for 1-bit "
                   "Adam): smaller checkpoints at scale, and a resume restarts them from zero (DeepSpeed's behaviour) "
                   "instead of continuing bit for bit")


def _add_data(p):
    g = p.add_argument_group("data")
    g.add_argument("--data-path", "--data", dest="data_path", default=None, nargs="+",
                   help="a .jsonl file (tokenized once, cached) or a .bin/.idx prefix; several, with or without "
                        "weights (Megatron's '0.3 web 0.7 code'), blend; default: the bundled corpus")
    g.add_argument("--mock-data", action="store_true", help="random tokens (for speed tests)")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", default=None, nargs="+", help=f"the {split} corpus "
                       "or blend, whole (instead of --data-path and --split)" + (
                           "; evaluated once at the end of training" if split == "test" else ""))
    g.add_argument("--data-args-path", default=None, help="a file holding the --data-path value (a long blend)")
    g.add_argument("--per-split-data-args-path", default=None,
                   help='a JSON file {"train": [...], "valid": [...], "test": [...]} of the per-split data paths')
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--tokenizer-type", default=None,
                   help="bundled (default), sentencepiece/llama2, llama3/tiktoken, hf, GPT2BPETokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--data-cache-dir", default=None, help="where tokenized jsonl is cached (default ./data_cache)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank that read "
                   "ahead (Megatron's default is 2; 0 reads in the training process)")


def _add_logging(p):
    g = p.add_argument_group("logging, eval, checkpoints")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=5)
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard events, with Megatron's tag names")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="write the per-iteration scalars every N iterations (Megatron's; the log line's is "
                        "--log-interval)")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000, help="events held before a write")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="iteration-time and throughput (TFLOP/s per GPU) per --log-interval")
    g.add_argument("--log-memory-to-tensorboard", action="store_true", help="the CUDA allocator's byte counts")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false")
    g.add_argument("--no-log-learning-rate-to-tensorboard", dest="log_learning_rate_to_tensorboard",
                   action="store_false")
    g.add_argument("--log-params-norm", action="store_true", help="log the parameters' L2 norm (a collective)")
    g.add_argument("--log-num-zeros-in-grad", action="store_true", help="log the count of zero gradient entries")
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument("--save", default=None,
                   help="checkpoint directory: saved every --save-interval steps and at the end")
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints in --save")
    g.add_argument("--exit-signal-handler", dest="exit_signal_handler", action="store_true", default=None,
                   help="on SIGTERM, save a checkpoint at the end of the iteration and exit (default with --save)")
    g.add_argument("--no-exit-signal-handler", dest="exit_signal_handler", action="store_false")
    g.add_argument("--use-checkpoint-args", action="store_true", help="take the model shape (incl. rope scaling "
                   "and tied embeddings) from the --load checkpoint (or --pretrained-checkpoint, an HF folder too)")
    g.add_argument("--loss-log", default=None, help="append 'iteration loss' lines with the exact (repr) loss, "
                   "to compare runs bit for bit")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset optimizer, step and data")
    g.add_argument("--exit-interval", type=int, default=None, help="stop (saving with --save) at the next "
                   "iteration that is a multiple of this (Megatron's): each relaunch trains this many more")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (with --save) and stop once the run has trained this many minutes (a job's time limit)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(None, description="Megatron-style Llama pretraining")  # prog: the script
    for add in (_add_model, _add_training, _add_parallel, _add_data, _add_logging, add_megatron_args, add_fp8_args,
                add_moe_args, add_async_save_args, add_progress_log_args, add_optimizer_args, add_loop_args,
                add_timing_args, add_pipeline_args):
        add(p)
    return p


def shape_overrides(args) -> dict:
    """--model's fields the shape flags replace (None: kept); estimate-memory prices a launch line by the same."""
    overrides = dict(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                     num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                     max_position_embeddings=args.max_position_embeddings, vocab_size=args.vocab_size,
                     rope_theta=args.rope_theta, norm_eps=args.norm_epsilon, init_method_std=args.init_method_std)
    return dict(overrides, tie_word_embeddings=False) if args.untie_embeddings_and_output_weights else overrides


def _derive(args, world_size: int):
    from megallama.argument_checks import check_context_parallel, check_run_flags
    from megallama.data.gpt2_tokenizer import gpt2_flags_to_model
    apply_megatron_defaults(args)
    check_run_flags(args)
    args.tokenizer_model = gpt2_flags_to_model(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                               args.merge_file)  # GPT2BPETokenizer's two files as one value
    for k in ("vocab_file", "merge_file"):  # saved in checkpoints: must not depend on the cwd
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    if args.mixed_precision in ("bfloat16", "bf16"):
        args.bf16 = True
    if args.mixed_precision in ("float16", "fp16"):
        args.fp16 = True
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive; pick one")
    if args.mixed_precision in ("float32", "fp32") and (args.bf16 or args.fp16):
        raise ConfigError(f"--mixed-precision {args.mixed_precision} and --{'bf16' if args.bf16 else 'fp16'} "
                          "contradict each other; pick one")
    if args.activation_checkpointing and args.recompute_granularity is None:
        args.recompute_granularity = "full"
    if args.use_distributed_optimizer and args.zero_stage is None:
        args.zero_stage = 1
    check_model_flags(args)
    from megallama.strategies import derive_strategy_flags
    strategy = derive_strategy_flags(args)  # the experts (validated against the model) go in the config
    args.model_config = strategy.model_config(get_model_config(args.model, **shape_overrides(args)))
    args.model_config = apply_shape_flags(args, args.model_config)
    if args.use_checkpoint_args:
        pretrained = getattr(args, "pretrained_checkpoint", None)
        from megallama.checkpointing.files import holds_checkpoint
        source = args.load if args.load and (not pretrained or holds_checkpoint(args.load)) else pretrained
        if not source:
            raise ConfigError("--use-checkpoint-args needs --load or --pretrained-checkpoint pointing at a "
                              "checkpoint (or an HF model folder)")
        from megallama.checkpointing import model_config_from_checkpoint
        args.model_config = model_config_from_checkpoint(source)
        args.vocab_size = args.model_config.vocab_size  # the checkpoint's vocabulary, not the tokenizer's
        if args.seq_length is None:  # Megatron's load_args_from_checkpoint: the checkpoint's, unless typed
            args.seq_length = checkpoint_seq_length(source)
    ctx = args.model_config.max_position_embeddings
    if args.seq_length is None:
        args.seq_length = min(ctx, 2048)
    if args.seq_length <= 0:
        raise ConfigError(f"--seq-length must be positive, got {args.seq_length}")
    if args.seq_length > ctx:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds {args.model}'s context of {ctx} tokens; use "
                          f"--seq-length <= {ctx} or raise --max-position-embeddings")
    if args.auto_configure:  # fills in the layout flags below as if typed (the user's fixed ZeRO stage kept)
        from megallama.autoconfig_args import apply_auto_configure
        world_size = args.world_size = apply_auto_configure(args, world_size)
    args.zero_stage = args.zero_stage or 0
    derive_pipeline(args)  # the split of the layers over the (virtual) stages
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:  # Megatron: a warning, then off
        from megallama.initialize import warn_rank_0
        warn_rank_0("--sequence-parallel has no effect with --tensor-model-parallel-size 1; turned off")
        args.sequence_parallel = False
    if args.context_parallel_size > 1:
        check_context_parallel(args)
    # Batch sizes: global = micro * dp * num_microbatches.
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if args.gpus is not None and args.gpus * args.nodes != world_size and (world_size > 1 or not args.dry_run):
        raise ConfigError(f"--gpus {args.gpus} x --nodes {args.nodes} does not match the launched world size "
                          f"{world_size}; launch with torchrun --nproc_per_node {args.gpus} (or megallama train "
                          f"--gpus {args.gpus}, which does), or add --dry-run to only plan")
    if world_size % (tp * pp * cp):
        plan = f" (a --dry-run plans --gpus x --nodes GPUs: pass --gpus {tp * pp * cp})" if args.dry_run else ""
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; launch a multiple "
                          f"of {tp * pp * cp} processes or change the parallel sizes{plan}")
    dp = world_size // (tp * pp * cp)
    args.data_parallel_size = dp
    if args.global_batch_size is None and args.batch_size_alias is not None:
        args.global_batch_size = args.batch_size_alias
    if args.micro_batch_size is None:
        args.micro_batch_size = max(1, min(4, (args.global_batch_size or 4 * dp) // dp))
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    for name in ("micro_batch_size", "global_batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by micro-batch "
                          f"{args.micro_batch_size} x data-parallel size {dp}; make it a multiple of "
                          f"{args.micro_batch_size * dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    check_pipeline_microbatches(args)  # before any model is built
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is above --lr {args.lr}; the schedule decays from --lr to --min-lr")
    if args.save_interval is not None and args.save_interval <= 0:
        raise ConfigError(f"--save-interval must be positive, got {args.save_interval}")
    if args.keep_last is not None and args.keep_last <= 0:
        raise ConfigError(f"--keep-last must be positive, got {args.keep_last}")
    for name in ("train_iters", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    samples_to_iters(args)
    setup_rampup(args)
    check_schedule_flags(args)
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler contradict each "
                          "other; pass at most one")
    check_fp8_flags(args)
    check_checkpoint_flags(args)
    check_loop_flags(args)
    return args


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.given_flags = given_dests(argv)  # a Megatron launch line takes Megatron's defaults
    args.world_size = world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    return _derive(args, world_size)
