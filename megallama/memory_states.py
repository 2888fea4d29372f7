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
    every rank at stages 0-2 and sharded over N at stage 3 (``optimizer/zero3_flat.py`` shards a LoRA base as it
    does the adapters); experts shard over the expert-data-parallel group (N/ep)."""
    trainable, experts, frozen = split
    st = model_states_bytes(trainable, zero_stage, n, *pkg)
    st["weights"] += pkg[0] * frozen / (max(1, n) if zero_stage >= 3 else 1)
    if experts:
        ex = model_states_bytes(experts, zero_stage, max(1, n // ep), *pkg)
        st = {key: st[key] + ex[key] for key in st}
    return st


def layer_params(cfg: ModelConfig, tp: int) -> Dict[str, int]:
    """One dense decoder layer on a tp rank: attention, MLP, the two norms (replicated)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = (2 * h * h + 2 * h * cfg.num_query_groups * d) // tp
    return {"attn": attn, "mlp": 3 * h * cfg.ffn_hidden_size // tp, "norms": 2 * h}


def lora_params(cfg: ModelConfig, rank: int, targets, tp: int, ffn: Optional[int] = None) -> int:
    """One layer's adapters on a tp rank: rank x (the side its base layer keeps whole + the side it splits over
    tp); column-parallel A [r, in] whole, B [out/tp, r]; row-parallel (o_proj, down_proj) A [r, in/tp], B [out, r].
    ``ffn``: the layer's Linear MLP (an MoE layer's shared expert; 0: none, its MLP targets adapt nothing)."""
    h, kv, f = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim, cfg.ffn_hidden_size if ffn is None else ffn
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (h, f)}
    bad = [t for t in targets if t not in dims]
    if bad:
        raise ConfigError(f"LoRA target modules {bad} unknown; choose from {', '.join(dims)}")
    return sum(rank * (dims[t][0] + dims[t][1] // tp) for t in targets if dims[t][1])


def num_moe_layers(cfg: ModelConfig) -> int:
    return cfg.num_layers if cfg.moe_layers is None else len(cfg.moe_layers)  # [] (a 0-only pattern): none


def param_counts(cfg: ModelConfig, strategy: str = "standard", lora_rank: int = 8,
                 lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_ffn_hidden_size: Optional[int] = None,
                 moe_shared_expert_intermediate_size: Optional[int] = None,
                 moe_shared_expert_gate: bool = False) -> Dict[str, int]:
    """The whole model (no tp/pp/ep split) as ``strategies.apply_strategy`` builds it: the one count behind the
    start-up log's model line and the estimator's split, so the two cannot disagree. A MoE layer (``cfg``'s experts
    and layers, under 'moe' and 'hybrid') swaps its MLP for the experts and 'moe_dense' (router, shared expert and
    its gate); LoRA adapts every target projection, of a MoE layer's MLP only the shared expert (experts are not
    Linear layers)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    on = strategy in ("moe", "hybrid") and cfg.num_experts
    moe_ids = (set(range(cfg.num_layers)) if cfg.moe_layers is None else set(cfg.moe_layers)) if on else set()
    shared = (moe_shared_expert_intermediate_size or 0) if on else 0
    n = len(moe_ids)
    experts = n * cfg.num_experts * 3 * h * (moe_ffn_hidden_size or f)
    moe_dense = n * (cfg.num_experts * h + 3 * h * shared + (h if shared and moe_shared_expert_gate else 0))
    adapters = sum(lora_params(cfg, lora_rank, list(lora_targets), 1, shared if i in moe_ids else f)
                   for i in range(cfg.num_layers)) if strategy in ("lora", "hybrid") else 0
    swap = experts + moe_dense - n * 3 * h * f
    return {"total": cfg.num_params() + swap + adapters, "without_embeddings": cfg.num_params(False) + swap + adapters,
            "experts": experts, "moe_dense": moe_dense, "adapters": adapters, "moe_layers": n,
            "num_experts": cfg.num_experts if n else 0}


def model_split(cfg: ModelConfig, strategy: str = "standard", lora_rank: int = 8,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_ffn_hidden_size: Optional[int] = None,
                moe_shared_expert_intermediate_size: Optional[int] = None, moe_shared_expert_gate: bool = False):
    """``trainable_split`` of ``param_counts``: a MoE layer's experts are experts, its router and shared expert
    dense."""
    c = param_counts(cfg, strategy, lora_rank, lora_targets, moe_ffn_hidden_size,
                     moe_shared_expert_intermediate_size, moe_shared_expert_gate)
    return trainable_split(strategy, c["total"] - c["experts"] - c["moe_dense"] - c["adapters"], c["experts"],
                           c["adapters"], c["moe_dense"])


def checkpoint_bytes(local_params: float, optimizer_bytes: float, p: float) -> float:
    """What the busiest rank (data-parallel rank 0, tp rank 0) writes to a checkpoint (checkpointing/
    save_request.py): its model tensors (all of its stage, in the parameter dtype, also under ZeRO-3, which gathers
    them) and its optimizer states (fp32 master, m, v; a ZeRO shard or, at stage 0, all of them). --async-save keeps
    this much page-locked host memory per rank from the first save on (pinned buffers are reused, not freed)."""
    return p * local_params + optimizer_bytes
