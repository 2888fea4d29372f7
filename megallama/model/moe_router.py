"""MoE router: the gate linear and top-k selection with Megatron's options.

``--moe-router-score-function softmax`` (default): without ``--moe-router-pre-softmax`` the k largest logits are
picked and softmax runs over those k (Mixtral; Megatron's default, megallama's ``norm_topk_prob``); with it the
softmax runs over all experts first and the k chosen probabilities are kept as they are (Switch, Qwen1.5-MoE). At
k = 1 both are the pre-softmax routing (a softmax over one logit would be the constant 1 and give the router no
gradient; Megatron refuses that combination, megallama routes k = 1 pre-softmax either way).
``sigmoid``: k largest sigmoid scores, renormalised to sum 1 when k > 1 (DeepSeek-V3). ``--moe-router-topk-scaling-
factor`` multiplies the chosen weights. The load-balancing statistics use every expert's score: the softmax over
all experts, or the sigmoid scores normalised over all experts (Megatron's ``compute_routing_scores_for_aux_loss``).

``--moe-router-dtype fp32|fp64``: logits, scores and weights are computed in that dtype. megallama's router is
fp32 by default (Megatron's default is the activations' dtype, bf16 under --bf16).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def topk_routing(logits: torch.Tensor, k: int, norm_topk_prob: bool = True, score_function: str = "softmax",
                 scaling_factor: Optional[float] = None):
    """logits [T, E] -> (scores [T, E] for the load-balancing statistics, top_p [T, k] combine weights,
    top_i [T, k] expert ids)."""
    if score_function == "sigmoid":
        sig = torch.sigmoid(logits)
        top_p, top_i = torch.topk(sig, k, dim=-1)
        if k > 1:
            top_p = top_p / (top_p.sum(-1, keepdim=True) + 1e-20)
        scores = sig / (sig.sum(-1, keepdim=True) + 1e-20)
    elif score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
        if k > 1 and norm_topk_prob:  # softmax over the k largest logits
            top_l, top_i = torch.topk(logits, k, dim=-1)
            top_p = torch.softmax(top_l, dim=-1)
        else:
            top_p, top_i = torch.topk(scores, k, dim=-1)
    else:
        raise ValueError(f"unknown router score function {score_function!r}; use one of {SCORE_FUNCTIONS}")
    if scaling_factor:
        top_p = top_p * scaling_factor
    return scores, top_p, top_i


class TopKRouter(nn.Module):
    """Linear gate [E, h], replicated over tp and ep; computed in ``dtype`` (fp32 or fp64) outside autocast."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float, sequence_parallel: bool, device=None,
                 dtype=None, router_dtype: str = "fp32"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        self.weight.init_std = init_std
        self.weight.sequence_parallel = sequence_parallel  # sees only this rank's tokens under SP
        self.compute_dtype = ROUTER_DTYPES[router_dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))
