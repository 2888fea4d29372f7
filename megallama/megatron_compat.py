"""Megatron-LM's flags for a Llama run, so that a Megatron launch script runs here unchanged.

Three kinds. Flags that restate what a Llama is here (RMSNorm, SwiGLU, RoPE, no biases, no dropout) or pick an
implementation (fused kernels, flash attention, mcore models, Transformer Engine): accepted when they agree, one
error line when they ask for another model. Aliases: ``--rotary-base`` is ``--rope-theta``, sample counts are
iteration counts at the (constant) global batch. And flags with their own behaviour, read where it happens:
``--make-vocab-size-divisible-by`` (build_data), ``--use-rope-scaling`` (the model config), ``--no-load-optim``,
``--no-load-rng``, ``--no-save-optim``, ``--exit-on-missing-checkpoint`` (checkpointing) and
``--distributed-timeout-minutes`` (initialize).
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError

# store_true flags that only say "this is a Llama" or pick an implementation: nothing to do
_RESTATED = ("--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings", "--no-position-embedding",
             "--use-mcore-models", "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--use-flash-attn",
             "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--moe-grouped-gemm",
             "--log-throughput")
# flag -> (the one value a Llama here has, why)
_FIXED = {"normalization": ("RMSNorm", "Llama normalises with RMSNorm"),
          "position_embedding_type": ("rope", "Llama's positions are rotary"),
          "rotary_percent": (1.0, "Llama rotates every head dimension"),
          "attention_dropout": (0.0, "Llama trains without dropout"),
          "hidden_dropout": (0.0, "Llama trains without dropout")}
_SAMPLE_FLAGS = (("train_samples", "train_iters"), ("lr_decay_samples", "lr_decay_iters"),
                 ("lr_warmup_samples", "lr_warmup_iters"), ("lr_wsd_decay_samples", "lr_wsd_decay_iters"))


def add_megatron_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Megatron-LM flags", "accepted as Megatron defines them: " + " ".join(_RESTATED) +
                             " (nothing to choose here); --normalization RMSNorm, --position-embedding-type rope, "
                             "--rotary-percent 1.0, --attention-dropout 0, --hidden-dropout 0 (any other value is "
                             "refused); --transformer-impl local|transformer_engine and --moe-token-dispatcher-type "
                             "(megallama's own kernels and dispatcher either way)")
    for flag in _RESTATED:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--normalization", default=None, help=argparse.SUPPRESS)
    g.add_argument("--position-embedding-type", default=None, help=argparse.SUPPRESS)
    for flag in ("--rotary-percent", "--attention-dropout", "--hidden-dropout"):
        g.add_argument(flag, type=float, default=None, help=argparse.SUPPRESS)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "none"], default=None,
                   help="aux_loss (the default) or none (--moe-aux-loss-coeff 0)")
    g.add_argument("--rotary-base", dest="rope_theta", type=float, default=None, help="= --rope-theta")
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.1's RoPE frequency scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=None, help="with --use-rope-scaling (default 8)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the tokenizer's vocabulary to a multiple of this x tp (default: of tp)")
    for samples, iters in _SAMPLE_FLAGS:
        g.add_argument("--" + samples.replace("_", "-"), type=int, default=None,
                       help=f"= --{iters.replace('_', '-')} x --global-batch-size")
    g.add_argument("--no-load-optim", action="store_true", help="resume the weights, iteration and data, with a "
                   "fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true", help="on resume, start the RNG states from --seed")
    g.add_argument("--no-save-optim", action="store_true", help="save weights without optimizer states")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="--load with no checkpoint in it is an error (instead of starting from scratch)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=30.0,
                   help="timeout of the process group's collectives")
    g.add_argument("--data-cache-path", dest="data_cache_dir", default=None, help="= --data-cache-dir")


def check_model_flags(args) -> None:
    """Before the model config is built: refuse a flag asking for another model than a Llama."""
    for name, (value, why) in _FIXED.items():
        given = getattr(args, name, None)
        if given is not None and given != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {given:g} is not supported: {why} here; pass {flag} {value:g} or drop it"
                              if isinstance(value, float) else
                              f"{flag} {given} is not supported: {why} here; pass {flag} {value} or drop it")
    if args.rope_scaling_factor is not None and not args.use_rope_scaling:
        raise ConfigError("--rope-scaling-factor needs --use-rope-scaling")
    if args.make_vocab_size_divisible_by is not None and args.make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by must be >= 1, got {args.make_vocab_size_divisible_by}")
    if args.distributed_timeout_minutes <= 0:
        raise ConfigError(f"--distributed-timeout-minutes must be positive, got {args.distributed_timeout_minutes}")
    if args.moe_router_load_balancing_type == "none":
        args.moe_aux_loss_coeff = 0.0


def apply_rope_scaling(args, cfg):
    """--use-rope-scaling: Llama 3.1's scaling on a model that has none (or another factor)."""
    if not args.use_rope_scaling:
        return cfg
    import dataclasses

    from megallama.config import RopeScaling
    base = cfg.rope_scaling or RopeScaling()
    factor = args.rope_scaling_factor if args.rope_scaling_factor is not None else base.factor
    return cfg.replace(rope_scaling=dataclasses.replace(base, factor=factor))


def samples_to_iters(args) -> None:
    """Megatron's sample counts, once the global batch is known: iterations at that batch (train: whole ones, as
    Megatron's ``train_samples // global_batch_size``; the LR schedule's may be fractional, as its sample-based
    schedule is)."""
    gbs = args.global_batch_size
    for samples, iters in _SAMPLE_FLAGS:
        n = getattr(args, samples)
        if n is None:
            continue
        if getattr(args, iters) is not None:
            raise ConfigError(f"--{samples.replace('_', '-')} and --{iters.replace('_', '-')} both set it; pass one")
        if n < 1:
            raise ConfigError(f"--{samples.replace('_', '-')} must be positive, got {n}")
        if samples == "train_samples":
            if args.epochs is not None:
                raise ConfigError("--train-samples and --epochs both set the run's length; pass one")
            if n < gbs:
                raise ConfigError(f"--train-samples {n} is less than one global batch ({gbs})")
            args.train_iters = n // gbs
        else:
            setattr(args, iters, n / gbs)
