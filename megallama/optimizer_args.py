"""Megatron-LM's optimizer flags for the embedding/output LR and the gradient reduction dtype, and their checks.

``--decoupled-lr LR`` / ``--decoupled-min-lr LR``: the input embedding and the output layer train on the run's LR
schedule between their own peak and floor (``lr_scheduler``; the optimizer gives them groups of their own).
``--grad-reduce-in-bf16``: a ``--bf16`` model's gradient buffer stays bf16, so the data-parallel reduction moves
half the bytes (``optimizer/distributed.py`` says why it is done as Megatron does it).
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding/output LR and gradient reduction (Megatron names)")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak LR of the input embedding and output layer (the rest train at --lr), on the same "
                        "warmup and decay")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="with --decoupled-lr: the floor their LR decays to (default --min-lr)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: keep the gradient buffer in bf16 and reduce it over data-parallel ranks in "
                        "bf16 (half the bytes; Megatron's flag), instead of fp32 main_grad")


def check_optimizer_flags(args) -> None:
    """One error line per contradiction, once --bf16/--fp16 are resolved (before the LR defaults are)."""
    lr, low = getattr(args, "decoupled_lr", None), getattr(args, "decoupled_min_lr", None)
    if low is not None and lr is None:  # Megatron ignores it alone; here a flag does something or is refused
        raise ConfigError(f"--decoupled-min-lr {low:g} needs --decoupled-lr (the embedding/output layer's peak LR); "
                          "add it or drop --decoupled-min-lr")
    for flag, v in (("--decoupled-lr", lr), ("--decoupled-min-lr", low)):
        if v is not None and not v >= 0:
            raise ConfigError(f"{flag} must be >= 0, got {v:g}")
    if low is not None and low > lr:
        raise ConfigError(f"--decoupled-min-lr {low:g} is above --decoupled-lr {lr:g}; the schedule decays from "
                          "--decoupled-lr to --decoupled-min-lr")
    if not getattr(args, "grad_reduce_in_bf16", False):
        return
    if not args.bf16:
        raise ConfigError("--grad-reduce-in-bf16 reduces a --bf16 model's gradients in bf16 (Megatron applies it "
                          "under --bf16 only); add --bf16 or drop it")
    if getattr(args, "params_dtype", "auto") not in ("auto", "bf16"):
        raise ConfigError(f"--grad-reduce-in-bf16 keeps the gradient buffer in the parameters' dtype (bf16 with "
                          f"--bf16), but --params-dtype {args.params_dtype} was given; drop one of them")
    if getattr(args, "gradient_compression", "none") not in (None, "none"):
        raise ConfigError(f"--grad-reduce-in-bf16 and --gradient-compression {args.gradient_compression} both pick "
                          "what the data-parallel reduction sends; pass one")
