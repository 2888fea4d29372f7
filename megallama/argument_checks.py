"""Checks of the run-control flags (device, logging, evaluation, files), each one ``ConfigError`` line naming the
fix, before anything is built: the alternative is a traceback at the first log step or after an iteration."""
from __future__ import annotations

import os
import re

from megallama.errors import ConfigError


def check_recompute_flags(args) -> None:
    """Megatron's rule: --recompute-method / --recompute-num-layers shape full recompute only; with selective they
    would be ignored silently. Their defaults are None so a typed flag shows; filled in here (uniform, 1)."""
    typed = [flag for flag, val in (("--recompute-method", args.recompute_method),
                                    ("--recompute-num-layers", args.recompute_num_layers)) if val is not None]
    if args.recompute_granularity == "selective" and typed:
        many = len(typed) > 1
        raise ConfigError(f"{' and '.join(typed)} {'apply' if many else 'applies'} to --recompute-granularity full "
                          f"only, not selective; drop {'them' if many else 'it'} or use full")
    if args.recompute_num_layers is not None and args.recompute_num_layers < 1:
        raise ConfigError(f"--recompute-num-layers must be >= 1, got {args.recompute_num_layers}")
    args.recompute_method = args.recompute_method or "uniform"
    args.recompute_num_layers = args.recompute_num_layers or 1
    from megallama.model.recompute import check_recompute_modules_args
    check_recompute_modules_args(args)


def check_run_flags(args) -> None:
    check_recompute_flags(args)
    args.data_blend = None
    if isinstance(args.data_path, list):  # one path, or a blend (Megatron's weight-path pairs, or paths)
        if len(args.data_path) > 1:
            from megallama.data.blended_dataset import parse_data_blend
            args.data_blend = parse_data_blend(args.data_path)
        args.data_path = " ".join(args.data_path)
    if isinstance(args.lora_target_modules, list):  # "q_proj v_proj" (PEFT users' spelling) or "q_proj,v_proj"
        args.lora_target_modules = ",".join(args.lora_target_modules)
    device = args.device
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device} is not cpu, cuda or cuda:N; pick one of those")
    if args.distributed_backend == "nccl" and device == "cpu":
        raise ConfigError("--distributed-backend nccl needs CUDA devices; use gloo with --device cpu")
    for name in ("log_interval", "tensorboard_log_interval", "tensorboard_queue_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.exit_interval is not None and args.exit_interval < 0:
        raise ConfigError(f"--exit-interval must be >= 0 (0: off), got {args.exit_interval}")
    args.exit_interval = args.exit_interval or None  # Megatron's 0 is off
    _note_unused_eval_iters(args)
    if args.eval_iters < 1:  # Megatron's: no validation and no test evaluation (its -1 and 0 alike)
        args.eval_iters, args.eval_interval = 0, None
    if args.min_loss_scale <= 0 or args.loss_scale_window < 1 or args.hysteresis < 1:
        raise ConfigError(f"fp16 loss scaling needs --min-loss-scale > 0, --loss-scale-window >= 1 and --hysteresis "
                          f">= 1; got {args.min_loss_scale:g}, {args.loss_scale_window}, {args.hysteresis}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be positive, got {args.exit_duration_in_mins}")
    if args.eval_interval is not None and args.eval_interval < 0:
        raise ConfigError(f"--eval-interval must be >= 0 (0: no evaluation), got {args.eval_interval}")
    args.eval_interval = args.eval_interval or None  # Megatron's 0 is off
    if args.loss_log and os.path.isdir(args.loss_log):
        raise ConfigError(f"--loss-log {args.loss_log} is a directory; pass a file path")
    if args.tensorboard_dir and os.path.exists(args.tensorboard_dir) and not os.path.isdir(args.tensorboard_dir):
        raise ConfigError(f"--tensorboard-dir {args.tensorboard_dir} is a file; pass a directory")
    if args.mock_data and args.epochs is not None and args.train_iters is None:
        raise ConfigError("--epochs counts passes over a dataset and --mock-data has none; give --train-iters")
    if args.mock_data and args.data_path:  # Megatron's mock dataset ignores the blend too: said, not silent
        from megallama.initialize import warn_rank_0
        given = args.data_path if isinstance(args.data_path, str) else " ".join(args.data_path)
        warn_rank_0(f"--mock-data trains on random tokens: --data-path {given} is not read; drop one of the two")
    if args.tokenizer_model and os.path.exists(args.tokenizer_model):  # saved in checkpoints: must not depend on cwd
        args.tokenizer_model = os.path.abspath(args.tokenizer_model)


def _note_unused_eval_iters(args) -> None:
    """A typed --eval-iters that evaluates nothing, in one warning: a negative one (Megatron's reading: off, not
    "the whole validation set"), or one without --eval-interval (megallama's default; Megatron's is 1000)."""
    from megallama.initialize import warn_rank_0
    if args.eval_iters < 0:
        warn_rank_0(f"--eval-iters {args.eval_iters} evaluates nothing (below 1 is off, as in Megatron; it is not "
                    "the whole validation set); pass a number of batches to evaluate")
    given = getattr(args, "given_flags", None) or ()
    if args.eval_iters > 0 and "eval_iters" in given and "eval_interval" not in given and not (
            args.eval_interval or getattr(args, "valid_data_path", None) or getattr(args, "skip_train", False)):
        warn_rank_0(f"--eval-iters {args.eval_iters} without --eval-interval evaluates nothing (megallama validates "
                    "every --eval-interval iterations and at the end; Megatron's default is 1000); add "
                    "--eval-interval N")


def check_context_parallel(args) -> None:
    """--context-parallel-size > 1, once the model and tp are known: the zig-zag sequence split, one --cp-comm-type
    for all layers, for a2a (Ulysses) the heads per tp rank that the all-to-all spreads over the cp ranks, for
    a2a+p2p the --hierarchical-context-parallel-sizes; one line before any model is built (it was found at the
    first forward)."""
    from megallama.model.context_parallel import single_comm_type
    from megallama.mpu.context_parallel import check_sequence_length
    cp, tp = args.context_parallel_size, args.tensor_model_parallel_size
    check_sequence_length(args.seq_length, cp)
    comm = args.cp_comm_type = single_comm_type(args.cp_comm_type)
    sizes = getattr(args, "hierarchical_context_parallel_sizes", None)
    if comm != "a2a+p2p" and sizes is not None:
        raise ConfigError(f"--hierarchical-context-parallel-sizes is for --cp-comm-type a2a+p2p, not {comm}; drop it "
                          "or use a2a+p2p")
    if comm == "a2a+p2p" and (sizes is None or len(sizes) != 2 or min(sizes) < 2 or sizes[0] * sizes[1] != cp):
        raise ConfigError(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A B (a2a size, p2p "
                          f"size), both >= 2, with A x B = --context-parallel-size {cp}; got {sizes}")
    heads = args.model_config.num_attention_heads
    a2a = {"a2a": cp, "a2a+p2p": sizes[0] if sizes else cp}.get(comm)
    if a2a and heads % tp == 0 and (heads // tp) % a2a:
        what = f"--context-parallel-size {cp}" if comm == "a2a" else f"the a2a size {a2a}"
        raise ConfigError(f"--cp-comm-type {comm} needs the {heads // tp} attention heads per tensor-parallel rank "
                          f"({heads}/{tp}) to be divisible by {what}; use --cp-comm-type p2p or allgather "
                          "(any head count) or another context-parallel size")
