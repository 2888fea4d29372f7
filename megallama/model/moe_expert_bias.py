"""Aux-loss-free load balancing (DeepSeek-V3; Megatron's ``--moe-router-enable-expert-bias``): once per step every
router's ``expert_bias`` moves by ``rate * sign(mean_load - load_e)``, so an over-loaded expert is chosen less.

``load_e`` is the tokens the router sent to expert e over the whole global batch: every micro-batch of the step
(counted in the router's training forwards, ``TopKRouter.route``) and every rank that routed other tokens: dp and
cp, and tp under sequence parallelism (without it the tp ranks route the same tokens; Megatron always has SP with
MoE and tp, and sums over its tp x dp x cp group). Not pp: each stage updates its own layers. So the bias is the
same on every rank that holds the router (replicated, like a dp-replicated weight) and any layout equals one
process. Megatron runs it in ``finalize_model_grads``, before the optimizer step; here it runs right after the step
(``training.py``), the same point between this step's last forward and the next step's first. A skipped step
(fp16 overflow) still updates the bias, as Megatron's."""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.pipeline.model_chunks import unwrap_model


def expert_bias_routers(model_chunks: Iterable[torch.nn.Module]) -> List[torch.nn.Module]:
    """This rank's routers with an expert bias, in module order (the same order on every rank of a stage)."""
    return [m for chunk in model_chunks for m in chunk.modules() if getattr(m, "enable_expert_bias", False)]


def get_updated_expert_bias(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor, rate: float) -> torch.Tensor:
    """Megatron's rule on the global counts ([..., E]): bias + rate * sign(mean over experts - load)."""
    mean = tokens_per_expert.sum(-1, keepdim=True) / tokens_per_expert.shape[-1]
    return expert_bias + torch.sign(mean - tokens_per_expert).to(expert_bias.dtype) * rate


def _token_groups(sequence_parallel: bool):
    """Process groups whose ranks routed other tokens of this step: dp x cp, then tp under sequence parallelism."""
    if not dist.is_initialized():
        return []
    groups = []
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        groups.append(ps.get_data_parallel_group(with_context_parallel=True))
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        groups.append(ps.get_tensor_model_parallel_group())
    return groups


@torch.no_grad()
def update_expert_bias(model_chunks) -> None:
    """After each optimizer step: sum the step's counts over the token-splitting ranks (one all-reduce per group
    for all layers), move every bias, reset the counts. A no-op without expert-bias routers."""
    routers = expert_bias_routers(model_chunks)
    if not routers:
        return
    if len(model_chunks) > 1 and getattr(unwrap_model(model_chunks[0]), "pipeline_schedule", None) == "chimera":
        raise ConfigError("--moe-router-enable-expert-bias is not supported with --pipeline-schedule chimera (its "
                          "two copies of each layer would count different tokens); use another schedule")
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    for group in _token_groups(routers[0].sequence_parallel):
        dist.all_reduce(counts, group=group)
    for r, c in zip(routers, counts):
        r.expert_bias.copy_(get_updated_expert_bias(c, r.expert_bias, r.bias_update_rate))
        r.local_tokens_per_expert.zero_()
