"""MoE router: the gate linear and top-k selection with Megatron's options.

``--moe-router-score-function softmax`` (default): without ``--moe-router-pre-softmax`` the k largest logits are
picked and softmax runs over those k (Mixtral; Megatron's default, megallama's ``norm_topk_prob``); with it the
softmax runs over all experts first and the k chosen probabilities are kept as they are (Switch, Qwen1.5-MoE). At
k = 1 both are the pre-softmax routing (a softmax over one logit would be the constant 1 and give the router no
gradient; Megatron refuses that combination, megallama routes k = 1 pre-softmax either way).
``sigmoid``: k largest sigmoid scores, renormalised to sum 1 when k > 1 (DeepSeek-V3). ``--moe-router-topk-scaling-
factor`` multiplies the chosen weights. The load-balancing statistics use every expert's score: the softmax over
all experts, or the sigmoid scores normalised over all experts (Megatron's ``compute_routing_scores_for_aux_loss``).

``--moe-router-num-groups G --moe-router-group-topk K`` (device-limited routing, DeepSeek-V2/V3): Megatron-core's
``group_limited_topk``. The experts form G equal consecutive groups; a group's score is the sum of its top
``topk // K`` selection scores (DeepSeek-V3's top-2 at topk 8, K 4; the same rule for softmax and sigmoid); each
token keeps its K best groups and picks its top-k experts among them. The selection scores are those the top-k
runs on: the logits (softmax over the chosen k), the softmax (pre-softmax) or the sigmoid (+ expert bias).

``--moe-router-enable-expert-bias`` (aux-loss-free balancing, DeepSeek-V3): an fp32 ``expert_bias`` buffer is
added to the sigmoid scores to choose the experts only; the gating weights are the unbiased scores. Sigmoid only,
as Megatron's TransformerConfig asserts. The tokens each expert gets are counted here; ``moe_expert_bias`` moves
the bias once per step.

``--moe-router-dtype fp32|fp64``: logits, scores and weights are computed in that dtype. megallama's router is
fp32 by default (Megatron's default is the activations' dtype, bf16 under --bf16).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megallama import compile_disable
from megallama.errors import ConfigError
from megallama.model.moe_dispatch import expert_counts

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # Megatron's --moe-router-bias-update-rate


def group_limited_topk(scores: torch.Tensor, k: int, num_groups: int, group_topk: int):
    """Megatron-core's ``group_limited_topk``: (values, ids) of the k best experts of each token's ``group_topk``
    best groups, a group scoring the sum of its top ``k // group_topk`` scores."""
    T, E = scores.shape
    group_scores = scores.view(T, num_groups, -1).topk(k // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
    return torch.topk(scores.masked_fill(~expert_mask, float("-inf")), k, dim=-1)


def _topk(scores, k, num_groups, group_topk):
    if group_topk:
        return group_limited_topk(scores, k, num_groups, group_topk)
    return torch.topk(scores, k, dim=-1)


def topk_routing(logits: torch.Tensor, k: int, norm_topk_prob: bool = True, score_function: str = "softmax",
                 scaling_factor: Optional[float] = None, expert_bias: Optional[torch.Tensor] = None,
                 num_groups: Optional[int] = None, group_topk: Optional[int] = None):
    """logits [T, E] -> (scores [T, E] for the load-balancing statistics, top_p [T, k] combine weights,
    top_i [T, k] expert ids). ``expert_bias`` [E] (sigmoid) shifts the choice, not the weights."""
    if score_function == "sigmoid":
        sig = torch.sigmoid(logits)
        if expert_bias is not None:
            _, top_i = _topk(sig + expert_bias.to(sig.dtype), k, num_groups, group_topk)
            top_p = sig.gather(1, top_i)
        else:
            top_p, top_i = _topk(sig, k, num_groups, group_topk)
        if k > 1:
            top_p = top_p / (top_p.sum(-1, keepdim=True) + 1e-20)
        scores = sig / (sig.sum(-1, keepdim=True) + 1e-20)
    elif score_function == "softmax":
        if expert_bias is not None:  # validate() refuses it; a direct caller must not lose it silently
            raise ValueError("expert_bias needs the sigmoid score function")
        scores = torch.softmax(logits, dim=-1)
        if k > 1 and norm_topk_prob:  # softmax over the k largest logits
            top_l, top_i = _topk(logits, k, num_groups, group_topk)
            top_p = torch.softmax(top_l, dim=-1)
        else:
            top_p, top_i = _topk(scores, k, num_groups, group_topk)
    else:
        raise ValueError(f"unknown router score function {score_function!r}; use one of {SCORE_FUNCTIONS}")
    if scaling_factor:
        top_p = top_p * scaling_factor
    return scores, top_p, top_i


def check_router_options(moe) -> None:
    """Group routing and expert-bias settings of a MoEConfig: one ConfigError line per mistake."""
    G, K, E, k = moe.num_groups, moe.group_topk, moe.num_experts, moe.topk
    if (G is None) != (K is None):
        raise ConfigError("--moe-router-num-groups and --moe-router-group-topk go together (device-limited routing); "
                          "pass both or neither")
    if G is not None:
        if G < 1 or E % G:
            raise ConfigError(f"--moe-router-num-groups {G} must divide --num-experts {E} into equal groups; pick a "
                              "divisor of the expert count")
        if not 1 <= K <= G:
            raise ConfigError(f"--moe-router-group-topk {K} must be between 1 and --moe-router-num-groups {G}")
        if not K <= k <= K * (E // G):
            raise ConfigError(f"--moe-router-topk {k} must be between --moe-router-group-topk {K} (a kept group scores "
                              f"by its top topk // group-topk experts) and the {K * (E // G)} experts of the {K} kept "
                              "groups; change --moe-router-topk or --moe-router-group-topk")
    if moe.enable_expert_bias and moe.score_function != "sigmoid":
        raise ConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (as Megatron: "
                          "the bias shifts sigmoid scores); add it or drop the expert bias")
    if moe.bias_update_rate is not None and not moe.enable_expert_bias:
        raise ConfigError("--moe-router-bias-update-rate applies to --moe-router-enable-expert-bias; add it or drop "
                          "the rate")
    if moe.bias_update_rate is not None and moe.bias_update_rate < 0:
        raise ConfigError(f"--moe-router-bias-update-rate must be >= 0, got {moe.bias_update_rate}")


class TopKRouter(nn.Module):
    """Linear gate [E, h], replicated over tp and ep; computed in ``dtype`` (fp32 or fp64) outside autocast.

    With expert bias it holds ``expert_bias`` (a persistent fp32 buffer: checkpointed, replicated, never trained)
    and ``local_tokens_per_expert`` (this rank's routed tokens since the last update, not saved)."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float, sequence_parallel: bool, device=None,
                 dtype=None, router_dtype: str = "fp32", moe=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        self.weight.init_std = init_std
        self.weight.sequence_parallel = sequence_parallel  # sees only this rank's tokens under SP
        self.compute_dtype = ROUTER_DTYPES[router_dtype]
        self.sequence_parallel = sequence_parallel
        self.moe = moe
        self.enable_expert_bias = bool(moe is not None and moe.enable_expert_bias)
        if self.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
            self.register_buffer("local_tokens_per_expert", torch.zeros(num_experts, dtype=torch.float64,
                                                                        device=device), persistent=False)
            rate = moe.bias_update_rate
            self.bias_update_rate = DEFAULT_BIAS_UPDATE_RATE if rate is None else float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))

    def route(self, logits: torch.Tensor, topk: int):
        """``topk_routing`` with this router's options (``self.moe``); counts the chosen experts for the bias."""
        m = self.moe
        scores, top_p, top_i = topk_routing(logits, topk, m.norm_topk_prob, m.score_function, m.topk_scaling_factor,
                                            self.expert_bias if self.enable_expert_bias else None, m.num_groups,
                                            m.group_topk)
        if self.enable_expert_bias and torch.is_grad_enabled():
            self._count(top_i)
        return scores, top_p, top_i

    @compile_disable.disable
    def _count(self, top_i: torch.Tensor) -> None:
        """Training forwards only: a recompute inside backward was counted in its forward already (Megatron counts
        the routing map of training forwards the same way)."""
        if torch._C._current_graph_task_id() != -1:
            return
        self.local_tokens_per_expert += expert_counts(top_i, self.expert_bias.numel()).to(
            self.local_tokens_per_expert.dtype)
