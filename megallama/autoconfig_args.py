"""``--auto-configure`` for the scripts: ``autoconfig.choose_layout`` fills in the layout flags of parsed args.

It picks tp / pp / dp (and ep for a MoE model), the ZeRO stage, recompute and the micro-batch for the model, the
world size (the launched one, or ``--gpus`` x ``--nodes`` when planning from one process, e.g. with ``--dry-run``)
and the GPU memory (``--gpu-memory-gb``, else the visible device's), prints the choice with its reasons on rank 0,
and leaves the rest of argument checking to ``arguments._derive`` as if the user had typed the flags. What the
user fixed (micro-batch, global batch, ZeRO stage, recompute, the context-parallel size) stays fixed; with cp > 1
a MoE model's ep is searched over dp x cp (training's rule), so it may exceed dp. tp / pp / ep given together with
``--auto-configure`` are a contradiction and a one-line error.
"""
from __future__ import annotations

import contextlib
import io
import os

from megallama.errors import ConfigError


def _precision(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def planned_world_size(args, world_size: int) -> int:
    """The launched world, or the ``--gpus`` x ``--nodes`` a single process plans for."""
    if world_size > 1 or args.gpus is None:
        return world_size
    return args.gpus * args.nodes


def _zero_stages(args) -> tuple:
    """The ZeRO stages to search: the one given, else all; --overlap-param-gather needs a distributed optimizer."""
    if args.zero_stage is not None:
        return (args.zero_stage,)
    return (1, 2, 3) if getattr(args, "overlap_param_gather", False) else (0, 1, 2, 3)


def _gpus_per_node(args, world: int) -> int:
    return args.gpus or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(world, 8)


def apply_auto_configure(args, world_size: int) -> int:
    """Choose the layout and write it into ``args`` (``args.auto_layout`` the plan); returns the world size it
    planned for (ConfigError when nothing fits)."""
    from megallama.autoconfig import choose_layout, detect_gpu_memory_gb, vocab_config
    from megallama.memory_args import feature_kw, priced_device
    fixed = [f"--{flag} {val}" for flag, val in (("tensor-model-parallel-size", args.tensor_model_parallel_size),
                                                 ("pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                                                 ("expert-model-parallel-size", args.expert_model_parallel_size))
             if val != 1]
    if fixed:
        raise ConfigError(f"--auto-configure chooses the layout itself but {fixed[0]} was given; drop one of them")
    world = planned_world_size(args, world_size)
    if world != world_size and not args.dry_run:
        raise ConfigError(f"--auto-configure planned for {world} GPUs (--gpus x --nodes) but {world_size} process "
                          f"runs; launch with torchrun --nproc_per_node {args.gpus}, or add --dry-run to only plan")
    memory = args.gpu_memory_gb or detect_gpu_memory_gb()
    global_batch = args.global_batch_size or args.batch_size_alias
    rank0 = int(os.environ.get("RANK", "0")) == 0
    recompute = args.recompute_granularity
    vocab, multiple = tokenizer_vocab(args), getattr(args, "make_vocab_size_divisible_by", None) or 1
    quiet = contextlib.nullcontext() if rank0 else contextlib.redirect_stdout(io.StringIO())
    if args.context_parallel_size > 1:  # as check_context_parallel will: one string (estimate and plan need it)
        from megallama.model.context_parallel import single_comm_type
        args.cp_comm_type = single_comm_type(args.cp_comm_type)
    strategy = feature_kw(args)  # the model config already holds the experts (and cp's comm type at cp > 1)
    if args.pipeline_schedule not in (None, "interleaved"):  # interleaved: chunks depend on the pp, priced as 1F1B
        strategy["pipeline_schedule"] = args.pipeline_schedule
    with quiet:  # choose_layout prints its reasons itself when nothing fits
        plan = choose_layout(args.model_config, world, memory, args.seq_length, args.micro_batch_size, global_batch,
                             _precision(args), strategy.pop("strategy"), gpus_per_node=_gpus_per_node(args, world),
                             zero_stages=_zero_stages(args),
                             recomputes=(recompute,) if recompute else ("none", "selective", "full"),
                             mixed_precision_mode="autocast" if args.params_dtype == "fp32" else "params",
                             fused_kernels=not args.no_fused_kernels, device=priced_device(args, args.dry_run),
                             tokenizer_vocab=vocab, vocab_multiple=multiple,
                             context_parallel_size=args.context_parallel_size, **strategy)
    if plan is None:
        raise ConfigError(f"--auto-configure found no layout of {args.model} that fits {world} GPUs of "
                          f"{memory:.0f} GiB (reasons above); add GPUs, shorten --seq-length or use --strategy lora")
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = plan["tp"], plan["pp"]
    args.expert_model_parallel_size = plan["ep"]
    args.model_config = vocab_config(args.model_config, plan["tp"], vocab, multiple)  # as build_data will resize it
    warning = vocabulary_warning(args, vocab) if args.dry_run else None  # a real run's build_data says it
    args.zero_stage, args.micro_batch_size = plan["zero_stage"], plan["micro_batch_size"]
    args.recompute_granularity = None if plan["recompute"] == "none" else plan["recompute"]
    args.sequence_parallel = plan["sequence_parallel"]
    if global_batch is None:
        args.global_batch_size = plan["micro_batch_size"] * plan["dp"] * plan["num_microbatches"]
    args.auto_layout = {k: v for k, v in plan.items() if k not in ("estimate", "explanation")}
    if rank0:
        source = "--gpu-memory-gb" if args.gpu_memory_gb else "the visible GPU" if _cuda() else \
            "no GPU visible: assumed; set --gpu-memory-gb"
        print(f"{plan['explanation']}\n  GPU memory: {memory:.0f} GiB ({source})\n  flags: "
              f"{' '.join(layout_flags(args))}" + (f"\n{warning}" if warning else ""), flush=True)
    return world


def tokenizer_vocab(args):
    """The tokenizer's vocabulary when the embedding will follow it (no --vocab-size, not --mock-data), as
    training_setup.build_data resizes it; None otherwise. Loads the tokenizer only, tokenizes nothing. NullTokenizer's
    --vocab-size V is the tokenizer's, whose eod makes it V + 1: the embedding follows it too."""
    import copy
    null = is_null_tokenizer(args)
    if (args.vocab_size is not None and not null) or args.mock_data:
        return None
    from megallama.training_setup import build_tokenizer_from_args
    return build_tokenizer_from_args(copy.copy(args) if null else args).vocab_size  # a copy: it clears --vocab-size


def vocabulary_warning(args, vocab):
    """A published model whose embedding follows the bundled tokenizer (none named): one line with both sizes, as
    the dry run, the log and the estimate would otherwise price a smaller model than the name says without a word;
    None otherwise (our tiny models are made for the bundled tokenizer). ``args.model_config``: already resized."""
    from megallama.config import OFFICIAL_PARAM_COUNTS, get_model_config
    from megallama.startup_lines import built_param_counts, human
    from megallama.strategies import strategy_from_args
    named = getattr(args, "tokenizer_type", None) not in (None, "bundled") or getattr(args, "tokenizer_model", None)
    if vocab is None or named or args.model not in OFFICIAL_PARAM_COUNTS:
        return None
    own = get_model_config(args.model).vocab_size
    if vocab == own:
        return None
    strategy = strategy_from_args(args)
    built, full = (built_param_counts(c, strategy)["total"] for c in
                   (args.model_config, args.model_config.replace(vocab_size=own)))
    return (f"warning: {args.model}'s vocabulary is {own} but the embedding follows the bundled tokenizer's {vocab} "
            f"({human(built)} params, not {human(full)}); pass --tokenizer-type/--tokenizer-model for the model's own "
            f"tokenizer or --vocab-size {own}")


def is_null_tokenizer(args) -> bool:
    """--tokenizer-type NullTokenizer (or null): its --vocab-size is the tokenizer's, not the embedding's."""
    return str(getattr(args, "tokenizer_type", None) or "").lower() in ("null", "nulltokenizer")


def follow_tokenizer(args) -> str:
    """A plan made before the data (``cli train --dry-run``): ``args.model_config`` with the vocabulary the run
    builds (``tokenizer_vocab`` padded to tp x --make-vocab-size-divisible-by, build_data's rule). Returns a line
    saying where the vocabulary came from (and ``vocabulary_warning``'s under it); a tokenizer missing on the
    planning machine keeps the model's."""
    from megallama.autoconfig import vocab_config
    try:
        vocab = tokenizer_vocab(args)
    except ConfigError as e:
        return f"vocabulary: {args.model}'s {args.model_config.vocab_size} (the tokenizer does not load here: {e})"
    if vocab is None:
        given = "mock data" if args.mock_data else "the checkpoint's" if args.use_checkpoint_args else "--vocab-size"
        return f"vocabulary: {args.model_config.vocab_size} ({given})"
    args.model_config = vocab_config(args.model_config, args.tensor_model_parallel_size, vocab,
                                     getattr(args, "make_vocab_size_divisible_by", None) or 1)
    line = f"vocabulary: {args.model_config.vocab_size} (the tokenizer's {vocab}, padded as the run will)"
    warning = None if getattr(args, "auto_layout", None) and args.dry_run else vocabulary_warning(args, vocab)
    return f"{line}\n{warning}" if warning else line  # --auto-configure --dry-run printed it with the plan


def layout_flags(args) -> list:
    """The chosen layout as the flags that reproduce it without --auto-configure."""
    flags = ["--tensor-model-parallel-size", str(args.tensor_model_parallel_size), "--pipeline-model-parallel-size",
             str(args.pipeline_model_parallel_size), "--zero-stage", str(args.zero_stage), "--micro-batch-size",
             str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size)]
    if args.context_parallel_size > 1:
        flags += ["--context-parallel-size", str(args.context_parallel_size)]
    if args.expert_model_parallel_size > 1:
        flags += ["--expert-model-parallel-size", str(args.expert_model_parallel_size)]
    if args.sequence_parallel:
        flags.append("--sequence-parallel")
    if args.recompute_granularity:
        flags += ["--recompute-granularity", args.recompute_granularity]
        if getattr(args, "recompute_modules", None):
            flags += ["--recompute-modules", *args.recompute_modules]
    return flags


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
