"""Megatron-LM's MoE router, capacity and shared-expert flags (registered by arguments.py), and their way into the
strategy's parameters (``strategies.strategy_from_args``) and back to a command line (``api``).

Capacity: ``--moe-expert-capacity-factor`` is Megatron's (drop policy ``probs`` unless ``--moe-token-drop-policy``
says otherwise; a negative factor means no dropping, as Megatron). megallama's earlier ``--moe-capacity-factor``
is the same capacity with the drop policy ``position`` by default (its documented first-come-first-kept), so its
runs keep their meaning; pass one of the two.
"""
from __future__ import annotations

import argparse
import re
from typing import List

from megallama.errors import ConfigError

# strategy parameter -> flag (value flags), then the store_true ones
_VALUE_FLAGS = {"moe_expert_capacity_factor": "--moe-expert-capacity-factor",
                "moe_token_drop_policy": "--moe-token-drop-policy",
                "moe_router_topk_scaling_factor": "--moe-router-topk-scaling-factor",
                "moe_router_dtype": "--moe-router-dtype", "moe_router_score_function": "--moe-router-score-function",
                "moe_router_load_balancing_type": "--moe-router-load-balancing-type",
                "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
                "moe_router_num_groups": "--moe-router-num-groups", "moe_router_group_topk": "--moe-router-group-topk",
                "moe_router_bias_update_rate": "--moe-router-bias-update-rate"}
_SWITCHES = {"moe_pad_expert_input_to_capacity": "--moe-pad-expert-input-to-capacity",
             "moe_router_pre_softmax": "--moe-router-pre-softmax",
             "moe_shared_expert_overlap": "--moe-shared-expert-overlap",
             "moe_shared_expert_gate": "--moe-shared-expert-gate",
             "moe_upcycle_shared_expert": "--moe-upcycle-shared-expert",
             "moe_router_enable_expert_bias": "--moe-router-enable-expert-bias"}
STRATEGY_KEYS = frozenset(_VALUE_FLAGS) | frozenset(_SWITCHES)
# every flag that only shapes experts (arguments.py's and the ones above), for check_moe_flags
_MOE_ONLY = ("moe_router_topk", "moe_aux_loss_coeff", "moe_layer_freq", "moe_layers", "moe_z_loss_coeff",
             "moe_capacity_factor", "moe_ffn_hidden_size", "moe_upcycle") + tuple(_VALUE_FLAGS) + tuple(_SWITCHES)


def add_moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE (Megatron-LM's router, capacity and shared-expert flags)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="FFN size of a shared SwiGLU expert every token goes through, added to the routed output")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="accepted: the shared expert runs in the same stream here (same output)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared expert's output by sigmoid(x . w), a learned [1, h] gate (Qwen2-MoE)")
    g.add_argument("--moe-upcycle-shared-expert", action="store_true",
                   help="upcycling also copies the dense MLP into the shared expert (default: fresh init, as "
                   "Megatron); needs --moe-shared-expert-intermediate-size equal to the dense FFN size")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k (default: softmax over the k chosen logits)")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None,
                   help="multiply the chosen experts' weights by this")
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
                   help="dtype of the router logits and probabilities (default fp32)")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default=None,
                   help="softmax (default) or sigmoid (top-k weights renormalised, DeepSeek-V3)")
    g.add_argument("--moe-router-num-groups", type=int, default=None,
                   help="device-limited routing: split the experts into this many equal groups (with "
                   "--moe-router-group-topk)")
    g.add_argument("--moe-router-group-topk", type=int, default=None,
                   help="each token picks its experts among its best this-many groups, a group scoring the sum of "
                   "its top topk/group-topk scores (Megatron's group_limited_topk)")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the sigmoid scores to "
                   "choose experts only, moves by the update rate against each expert's load after every step")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=None,
                   help="step of the expert bias per update (default 1e-3, as Megatron)")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="each expert keeps at most ceil(factor * tokens * topk / experts) assignments per micro-batch "
                   "(negative or unset: no dropping)")
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default=None,
                   help="which assignments an over-full expert drops: the lowest weights (probs, default) or the "
                   "last sequence positions (position)")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="every expert computes exactly its capacity of rows (zero-weight padding): static shapes")


_PATTERN_TERM = re.compile(r"\[\s*((?:[01]\s*,\s*)*[01])?\s*,?\s*\](?:\s*\*\s*(\d+))?")


def moe_layer_freq_type(value: str):
    """Megatron's --moe-layer-freq: N (every N-th layer is MoE, from layer 0) or a per-layer 0/1 pattern such as
    ``([0]*1+[1]*27)`` or ``[0,1,1]`` (1: MoE), read without eval: a sum of ``[0/1 list]`` or ``[...]*count``."""
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    body = text[1:-1] if text.startswith("(") and text.endswith(")") else text
    out = []
    for term in body.split("+"):
        m = _PATTERN_TERM.fullmatch(term.strip())
        if m is None:
            raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor a 0/1 layer pattern such as "
                                             "([0]*1+[1]*27)")
        items = [int(x) for x in re.findall(r"[01]", m.group(1) or "")]
        out += items * int(m.group(2) or 1)
    return out


def check_moe_flags(args) -> None:
    """Before --strategy moe's default of 8 experts: --num-experts below 1 is refused (it became 8 silently), and so
    is a MoE flag on a dense model (it was ignored silently; --expert-model-parallel-size already was refused).
    A --use-checkpoint-args run may take its experts from the checkpoint, so its MoE flags are left to the load."""
    given = set(getattr(args, "given_flags", None) or ())
    if "num_experts" in given and args.num_experts is not None and args.num_experts < 1:
        raise ConfigError(f"--num-experts must be >= 1, got {args.num_experts}; drop it for a dense model")
    upcycles = getattr(args, "moe_upcycle", False) or getattr(args, "pretrained_checkpoint", None)
    if getattr(args, "moe_upcycle_shared_expert", False) and not upcycles:
        raise ConfigError("--moe-upcycle-shared-expert applies to upcycling; add --moe-upcycle (or a dense "
                          "--pretrained-checkpoint) or drop it")
    if args.num_experts or args.strategy in ("moe", "hybrid") or getattr(args, "use_checkpoint_args", False):
        return
    flags = ["--" + d.replace("_", "-") for d in _MOE_ONLY if d in given]
    if flags:
        raise ConfigError(f"{', '.join(flags)} configure{'s' if len(flags) == 1 else ''} MoE experts, but the model "
                          "has none; add --num-experts N (or --strategy moe), or drop "
                          f"{'it' if len(flags) == 1 else 'them'}")


def strategy_params(args) -> dict:
    """The MoE strategy parameters these flags set (only those given)."""
    out = {k: getattr(args, k, None) for k in _VALUE_FLAGS}
    out.update({k: True for k in _SWITCHES if getattr(args, k, False)})
    legacy = getattr(args, "moe_capacity_factor", None)
    if legacy is not None and out.get("moe_expert_capacity_factor") is not None:
        raise ConfigError("--moe-capacity-factor and --moe-expert-capacity-factor both set the expert capacity; "
                          "pass one (--moe-expert-capacity-factor is Megatron's)")
    return {k: v for k, v in out.items() if v is not None}


def moe_config_fields(p: dict) -> dict:
    """MoEConfig fields from strategy parameters (``moe_capacity_factor`` is megallama's earlier capacity flag)."""
    cf, policy = p.get("moe_expert_capacity_factor"), p.get("moe_token_drop_policy")
    legacy = p.get("moe_capacity_factor")
    if cf is not None and legacy is not None:
        raise ConfigError("moe_capacity_factor and moe_expert_capacity_factor both set the expert capacity; pass one")
    if cf is not None and cf < 0:  # Megatron: a negative factor is no capacity
        cf = None
    if legacy is not None:
        if legacy <= 0:
            raise ConfigError(f"--moe-capacity-factor must be positive, got {legacy}; leave it out for no token "
                              "dropping")
        cf, policy = legacy, policy or "position"
    if policy is not None and cf is None:
        raise ConfigError(f"--moe-token-drop-policy {policy} needs --moe-expert-capacity-factor (without a capacity "
                          "no token is dropped); add it or drop the policy")
    fields = dict(capacity_factor=cf, drop_policy=policy or "probs",
                  pad_to_capacity=bool(p.get("moe_pad_expert_input_to_capacity", False)),
                  norm_topk_prob=not p.get("moe_router_pre_softmax", False),
                  topk_scaling_factor=p.get("moe_router_topk_scaling_factor"),
                  router_dtype=p.get("moe_router_dtype") or "fp32",
                  score_function=p.get("moe_router_score_function") or "softmax",
                  load_balancing_type=p.get("moe_router_load_balancing_type") or "aux_loss",
                  shared_expert_intermediate_size=p.get("moe_shared_expert_intermediate_size"),
                  shared_expert_overlap=bool(p.get("moe_shared_expert_overlap", False)),
                  shared_expert_gate=bool(p.get("moe_shared_expert_gate", False)),
                  upcycle_shared_expert=bool(p.get("moe_upcycle_shared_expert", False)),
                  num_groups=p.get("moe_router_num_groups"), group_topk=p.get("moe_router_group_topk"),
                  enable_expert_bias=bool(p.get("moe_router_enable_expert_bias", False)),
                  bias_update_rate=p.get("moe_router_bias_update_rate"))
    return fields


def moe_strategy_argv(p: dict) -> List[str]:
    """These parameters of a ``TrainingStrategy`` as command-line flags (api.py's launch)."""
    argv = []
    for key, flag in _VALUE_FLAGS.items():
        if p.get(key) is not None:
            argv += [flag, str(p[key])]
    return argv + [flag for key, flag in _SWITCHES.items() if p.get(key)]


def moe_flops_config(args):
    """The run's MoEConfig (None for a dense model), for the FLOPs of the log line's MFU and --log-progress."""
    from megallama.strategies import strategy_from_args
    return strategy_from_args(args).moe_config(args.model_config.num_layers)
