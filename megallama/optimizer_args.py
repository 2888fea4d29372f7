"""Megatron-LM's optimizer flags for the embedding/output LR, the gradient reduction dtype and SGD, and their checks.

``--decoupled-lr LR`` / ``--decoupled-min-lr LR``: the input embedding and the output layer train on the run's LR
schedule between their own peak and floor (``lr_scheduler``; the optimizer gives them groups of their own).
``--grad-reduce-in-bf16``: a ``--bf16`` model's gradient buffer stays bf16, so the data-parallel reduction moves
half the bytes (``optimizer/distributed.py`` says why it is done as Megatron does it).

``--optimizer sgd`` with ``--sgd-momentum M`` (default 0.9, Megatron's): torch's SGD, L2 weight decay
(optimizer/torch_optimizer.py). As in Megatron the Adam flags are accepted with it and do nothing (launch scripts
carry them whatever the optimizer); ``--sgd-momentum`` without ``--optimizer sgd`` is refused, since it would do
nothing that its user surely meant, and so is 1-bit Adam's compression with SGD.

Megatron's other optimizer flags, so that a Megatron launch script gets one line per flag rather than argparse's
"unrecognized arguments": ``--use-precision-aware-optimizer`` with fp32 ``--main-grads-dtype``/``--main-params-dtype``/
``--exp-avg-dtype``/``--exp-avg-sq-dtype`` and ``--apply-wd-to-qk-layernorm`` restate megallama (fp32 masters and
Adam moments; a Llama here has no qk layernorm); lower-precision states, CPU offload and Xavier initialisation are
refused, each naming what megallama does instead. ``--adam-beta1/2``, ``--adam-eps``,
``--weight-decay`` and ``--clip-grad`` are checked here, before the model is built, with the flag's name.
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
    m = p.add_argument_group("Megatron's optimizer state, offload and init flags", "accepted where they restate "
                             "megallama (fp32 master weights and Adam moments, no qk layernorm), else refused")
    m.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="accepted with fp32 state dtypes (what megallama keeps); lower precisions are refused")
    for flag, choices in _STATE_DTYPE_FLAGS:
        m.add_argument(flag, choices=choices, default=None, help="fp32 only (megallama's master weights, gradients "
                       "and Adam moments are fp32)")
    m.add_argument("--apply-wd-to-qk-layernorm", action="store_true", help="accepted: a Llama here has no qk "
                   "layernorm (weight decay skips 1-D parameters and biases, as Megatron's default)")
    m.add_argument("--no-weight-decay-cond-type", choices=["apply_wd_to_qk_layernorm"], default=None,
                   help="= --apply-wd-to-qk-layernorm (Megatron's deprecated spelling)")
    for flag in ("--optimizer-cpu-offload", "--use-torch-optimizer-for-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d",
                 "--init-method-xavier-uniform"):
        m.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--optimizer-offload-fraction", type=float, default=None, help=argparse.SUPPRESS)
    m.add_argument("--no-pin-cpu-grads", dest="pin_cpu_grads", action="store_false", help=argparse.SUPPRESS)
    m.add_argument("--no-pin-cpu-params", dest="pin_cpu_params", action="store_false", help=argparse.SUPPRESS)
    m.add_argument("--sgd-momentum", type=float, default=None,
                   help="with --optimizer sgd: its momentum (default 0.9, as Megatron's; 0: plain SGD)")


_STATE_DTYPE_FLAGS = (("--main-grads-dtype", ["fp32", "bf16"]), ("--main-params-dtype", ["fp32", "fp16"]),
                      ("--exp-avg-dtype", ["fp32", "fp16", "bf16", "fp8"]),
                      ("--exp-avg-sq-dtype", ["fp32", "fp16", "bf16", "fp8"]))
_OFFLOAD = ("megallama keeps the optimizer states on the training device; shard them over the data-parallel ranks "
            "with --zero-stage 1, 2 or 3 (--use-distributed-optimizer) instead; drop it")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def check_megatron_optimizer_flags(args) -> None:
    """Megatron's optimizer-state, offload, SGD and init flags: accepted where they restate megallama, else one
    line saying what megallama does instead."""
    for flag, _ in _STATE_DTYPE_FLAGS:
        v = getattr(args, _dest(flag), None)
        if v not in (None, "fp32"):
            why = ("megallama's main grads are fp32 (a bf16 gradient buffer and reduction is --grad-reduce-in-bf16)"
                   if flag == "--main-grads-dtype" else "megallama keeps master weights and Adam moments in fp32 (the "
                   "precision-aware optimizer's default); for less optimizer memory shard them with --zero-stage")
            raise ConfigError(f"{flag} {v} is not supported: {why}; pass {flag} fp32 or drop it")
    offload = [f for f in ("--optimizer-cpu-offload", "--use-torch-optimizer-for-cpu-offload",
                           "--overlap-cpu-optimizer-d2h-h2d") if getattr(args, _dest(f), False)]
    offload += [f"--optimizer-offload-fraction {args.optimizer_offload_fraction:g}"] \
        if getattr(args, "optimizer_offload_fraction", None) is not None else []
    offload += [f"--no-pin-cpu-{what}" for what in ("grads", "params") if getattr(args, f"pin_cpu_{what}", True)
                is False]
    if offload:
        raise ConfigError(f"{offload[0]} is not supported: {_OFFLOAD}")
    check_sgd_flags(args)
    if getattr(args, "init_method_xavier_uniform", False):
        raise ConfigError("--init-method-xavier-uniform is not supported: megallama initialises weights from a normal "
                          "of std --init-method-std (output projections / sqrt(2 x layers), Megatron's default); "
                          "drop it")


def check_sgd_flags(args) -> None:
    """``--optimizer`` resolved (adam unless given) and ``--sgd-momentum`` to its default under sgd; momentum without
    SGD, or SGD under 1-bit Adam's compression, is one line."""
    args.optimizer = getattr(args, "optimizer", None) or "adam"
    momentum = getattr(args, "sgd_momentum", None)
    if args.optimizer != "sgd":
        if momentum is not None:
            raise ConfigError(f"--sgd-momentum {momentum:g} is the momentum of --optimizer sgd, but this run trains "
                              f"with --optimizer {args.optimizer} (AdamW); add --optimizer sgd or drop --sgd-momentum")
        return
    if momentum is None:
        args.sgd_momentum = momentum = 0.9
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"--sgd-momentum {momentum:g} must be in [0, 1); fix --sgd-momentum")
    if getattr(args, "gradient_compression", None) == "onebit":
        raise ConfigError("--gradient-compression onebit is 1-bit Adam (it compresses Adam's momentum and freezes its "
                          "variance) and cannot drive --optimizer sgd; pass --gradient-compression powersgd or topk")


def check_optimizer_values(args) -> None:
    """The Adam and clipping hyperparameters, with the flag's name, before the model is built (torch's and the
    optimizer's own checks would only fire after it)."""
    for flag in ("--adam-beta1", "--adam-beta2"):
        v = getattr(args, _dest(flag), None)
        if v is not None and not 0.0 <= v < 1.0:
            raise ConfigError(f"{flag} {v:g} must be in [0, 1); fix {flag}")
    checks = (("--adam-eps", lambda v: v > 0, "> 0"), ("--weight-decay", lambda v: v >= 0, ">= 0"),
              ("--clip-grad", lambda v: v >= 0, ">= 0 (0 turns clipping off, as in Megatron)"))
    for flag, ok, want in checks:
        v = getattr(args, _dest(flag), None)
        if v is not None and not ok(v):
            raise ConfigError(f"{flag} {v:g} must be {want}; fix {flag}")


def check_optimizer_flags(args) -> None:
    """One error line per contradiction, once --bf16/--fp16 are resolved (before the LR defaults are)."""
    check_megatron_optimizer_flags(args)
    check_optimizer_values(args)
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
