"""Model states per rank (weights, gradients, optimizer states) under ZeRO, and the host copy of a checkpoint.

ZeRO with p bytes/param, g bytes/grad, K bytes of optimizer state and N = dp*cp: stage 0 (p+g+K)Ψ,
1 (p+g)Ψ + KΨ/N, 2 pΨ + (g+K)Ψ/N, 3 (p+g+K)Ψ/N. Ours (megallama/optimizer): fp32 grads always (g = 4); with fp32
params and autocast (--params-dtype fp32) p = 4, K = 8 (Adam m, v; the master is the model); with bf16/fp16
parameters (mode 'params', the loop's default) p = 2, K = 12 (fp32 master + m + v). --optimizer sgd keeps one fp32
state (the momentum) instead of Adam's two: K = 4 and 8 (none at --sgd-momentum 0: K = 0 and 4). fp8
(--fp8-format) changes none of this: the weights stay 16-bit and no fp8 copy of them outlives a GEMM
(mpu/fp8_linear.py).
"""
from __future__ import annotations

from typing import Dict, Optional

from megallama.config import ModelConfig
from megallama.errors import ConfigError


def model_states_bytes(num_params: float, zero_stage: int, dp: int, p: float, g: float, k: float) -> Dict[str, float]:
    """ZeRO's per-rank model states: weights p*Ψ, grads g*Ψ, optimizer K*Ψ, each divided by N when sharded."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage {zero_stage} is not one of 0, 1, 2, 3; fix --zero-stage")
    n = max(1, dp)
    return {"weights": p * num_params / (n if zero_stage >= 3 else 1),
            "grads": g * num_params / (n if zero_stage >= 2 else 1),
            "optimizer": k * num_params / (n if zero_stage >= 1 else 1)}


def precision_bytes(precision: str, mode: str, states: int = 2):
    """(p, g, K) of our training for a precision and mixed-precision mode; ``states``: the optimizer's fp32 states
    per parameter (``optimizer_states``)."""
    if precision == "fp32" or mode == "autocast":
        return 4, 4, 4 * states
    return 2, 4, 4 + 4 * states


def optimizer_states(optimizer: str = "adam", sgd_momentum: float = 0.9) -> int:
    """fp32 states per parameter: Adam's m and v; SGD's momentum buffer (none without momentum)."""
    if optimizer == "sgd":
        return 1 if sgd_momentum else 0
    if optimizer != "adam":
        raise ConfigError(f"optimizer '{optimizer}' is not adam or sgd; fix --optimizer")
    return 2


def trainable_split(strategy: str, dense: float, experts: float, adapters: float, moe_dense: float = 0):
    """(trainable non-expert, trainable expert, frozen) parameters: LoRA trains the adapters on a frozen base (its
    experts too), hybrid the adapters and the MoE layers whole, standard and moe everything. ``moe_dense``: the MoE
    layers' routers and shared experts, dense weights (replicated over ep) that hybrid trains."""
    if strategy == "hybrid":
        adapters += moe_dense
    else:
        dense += moe_dense
    if strategy == "lora":
        return adapters, 0, dense + experts
    if strategy == "hybrid":
        return adapters, experts, dense
    return dense, experts, 0


def split_states_bytes(split, zero_stage: int, n: int, ep: int, pkg) -> Dict[str, float]:
    """Model states of a ``trainable_split`` over N = dp*cp ranks: frozen parameters keep weights only, whole on
    every rank at every stage (ZeRO-3 shards what the optimizer updates: ``optimizer/distributed.py`` takes the
    trainable parameters only, so a LoRA base is not sharded); experts shard over the expert-data-parallel group
    (N/ep)."""
    trainable, experts, frozen = split
    st = model_states_bytes(trainable, zero_stage, n, *pkg)
    st["weights"] += pkg[0] * frozen
    if experts:
        ex = model_states_bytes(experts, zero_stage, max(1, n // ep), *pkg)
        st = {key: st[key] + ex[key] for key in st}
    return st


def layer_params(cfg: ModelConfig, tp: int) -> Dict[str, int]:
    """One dense decoder layer on a tp rank: attention, MLP, the two norms (replicated)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = (2 * h * h + 2 * h * cfg.num_query_groups * d) // tp
    return {"attn": attn, "mlp": 3 * h * cfg.ffn_hidden_size // tp, "norms": 2 * h}


def lora_params(cfg: ModelConfig, rank: int, targets, tp: int) -> int:
    h, kv = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, cfg.ffn_hidden_size), "up_proj": (h, cfg.ffn_hidden_size),
            "down_proj": (cfg.ffn_hidden_size, h)}
    bad = [t for t in targets if t not in dims]
    if bad:
        raise ConfigError(f"LoRA target modules {bad} unknown; choose from {', '.join(dims)}")
    return sum(rank * (dims[t][0] + dims[t][1] // tp) for t in targets)


def num_moe_layers(cfg: ModelConfig) -> int:
    return len(cfg.moe_layers) if cfg.moe_layers else cfg.num_layers


def model_split(cfg: ModelConfig, strategy: str = "standard", lora_rank: int = 8,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_ffn_hidden_size: Optional[int] = None,
                moe_shared_expert_intermediate_size: Optional[int] = None):
    """``trainable_split`` of the whole model (no tp/pp): a MoE layer's experts (of ``moe_ffn_hidden_size``,
    default the dense FFN) are experts, its router and shared expert dense."""
    moe_layers = num_moe_layers(cfg) if strategy in ("moe", "hybrid") and cfg.num_experts else 0
    h, dense_mlp = cfg.hidden_size, layer_params(cfg, 1)["mlp"]
    experts = moe_layers * cfg.num_experts * 3 * h * (moe_ffn_hidden_size or cfg.ffn_hidden_size)
    shared = moe_layers * 3 * h * (moe_shared_expert_intermediate_size or 0)
    adapters = cfg.num_layers * lora_params(cfg, lora_rank, list(lora_targets), 1) \
        if strategy in ("lora", "hybrid") else 0
    return trainable_split(strategy, cfg.num_params() - moe_layers * dense_mlp, experts, adapters,
                           moe_layers * h * cfg.num_experts + shared)


def checkpoint_bytes(local_params: float, optimizer_bytes: float, p: float) -> float:
    """What the busiest rank (data-parallel rank 0, tp rank 0) writes to a checkpoint (checkpointing/
    save_request.py): its model tensors (all of its stage, in the parameter dtype, also under ZeRO-3, which gathers
    them) and its optimizer states (fp32 master, m, v; a ZeRO shard or, at stage 0, all of them). --async-save keeps
    this much page-locked host memory per rank from the first save on (pinned buffers are reused, not freed)."""
    return p * local_params + optimizer_bytes
