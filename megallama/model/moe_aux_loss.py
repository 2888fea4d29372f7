"""MoE auxiliary losses, Megatron's ``--moe-router-load-balancing-type`` definitions, and how they reach the gradient.

All three load-balancing losses are the Switch/GShard ``coeff * E / (k T^2) * sum_e counts_e * probs_sum_e``; they
differ in which tokens the statistics cover:

* ``aux_loss`` (default): one micro-batch. Counts and token totals are summed over the ranks holding pieces of
  that micro-batch (tp under sequence parallelism, cp), never over dp/ep, whose ranks hold other micro-batches: any
  dp/ep/tp/cp layout with the same micro-batch size equals one process.
* ``seq_aux_loss``: one loss per sequence (its own counts and T = its length), averaged over the micro-batch's
  sequences (DeepSeek-V2/V3). Layout-independent like ``aux_loss``.
* ``global_aux_loss``: counts summed over the data-parallel ranks too (Megatron's tp x dp x cp group) and averaged
  over the step's micro-batches so far (Megatron's ``global_tokens_per_expert / ga_steps``, reset every step); T is
  the token count of the dp ranks' micro-batches together, while each rank differentiates only its own tokens'
  probabilities. So it is layout-independent over tp, cp and ep (which only splits the experts), but not over dp:
  a run with D data-parallel ranks equals one process whose micro-batch j joins the D ranks' j-th micro-batches, at
  ``coeff / D`` (the D per-rank shares of the joint loss are averaged, as every gradient over dp, not summed).
* ``none``: no load-balancing loss, whatever ``aux_loss_coeff`` says (the command line also zeroes it; a
  ``TrainingStrategy`` or ``MoEConfig`` built in Python need not); the z-loss stays.

Gradients never touch the returned LM loss: the sum is attached to the layer's output with ``_AttachAuxLoss``
(Megatron's ``MoEAuxLossAutoScaler``), fed ``_AUX_GRAD_SCALE`` (1/micro-batches, x the fp16 loss scale) in
backward. Each rank attaches its share: tp shares are summed by the sequence-parallel gradient all-reduce, cp
shares averaged by the dp x cp gradient mean (hence the factor cp, as ``cp_mean_loss`` gives the LM loss).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.model.moe_dispatch import expert_counts
from megallama.model.moe_stats import get_moe_stats
from megallama.mpu import parallel_state as ps

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def load_balancing_loss(probs_sum: torch.Tensor, tokens_per_expert: torch.Tensor, num_tokens, topk: int,
                        coeff: float) -> torch.Tensor:
    """Switch/GShard loss ``coeff * E * sum_e f_e * P_e`` with f_e = tokens_per_expert / (T k) (fraction of the
    T*k assignments) and P_e = probs_sum / T (mean router probability). Equals ``coeff`` for a uniform router.
    Leading dimensions (one loss per sequence) are summed."""
    E = probs_sum.shape[-1]
    # a tensor count stays on the device: float() would synchronise the GPU in every MoE layer's forward
    n = num_tokens.to(probs_sum.dtype) if isinstance(num_tokens, torch.Tensor) else float(num_tokens)
    return coeff * E / (n * n * topk) * (tokens_per_expert * probs_sum).sum()


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: coeff * mean_t logsumexp(logits_t)^2."""
    return coeff * torch.logsumexp(logits, dim=-1).square().mean()


_AUX_GRAD_SCALE = 1.0
_STEP = 0


def set_aux_loss_scale(scale: float) -> None:
    """Called once per step before its micro-batches: the gradient scale of the attached aux losses
    (1/num_microbatches, x the fp16 loss scale, matching what the schedule applies to the LM loss). It also starts
    a new step for ``global_aux_loss``, whose statistics Megatron resets after every step's gradients."""
    global _AUX_GRAD_SCALE, _STEP
    _AUX_GRAD_SCALE = float(scale)
    _STEP += 1


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; in backward feeds ``aux`` the gradient ``_AUX_GRAD_SCALE``."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.save_for_backward(aux)
        return out

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, _AUX_GRAD_SCALE)


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    return _AttachAuxLoss.apply(out, aux)


def _in_backward() -> bool:
    """A recompute (activation checkpointing) re-running the forward inside backward."""
    return torch._C._current_graph_task_id() != -1


class GlobalTokenTracker:
    """One layer's ``global_aux_loss`` state: the dp-summed counts of this step's micro-batches and how many ran.

    A recompute inside backward (activation checkpointing) must see the average its forward saw (later
    micro-batches have moved it on since) and must not count again. Each forward keeps its (average, token total)
    under a key, the micro-batch's own statistics, which the recompute reproduces: it takes back the unused entry
    with the nearest key, on the device (no host sync), whatever order the backwards run in."""

    def __init__(self):
        self.step = None

    def update(self, key: torch.Tensor, counts: torch.Tensor, num_tokens: torch.Tensor):
        if self.step != _STEP:
            self.step, self.total, self.calls, self.keys, self.saved = _STEP, torch.zeros_like(counts), 0, [], []
            self.used = torch.zeros(0, dtype=torch.bool, device=counts.device)
        self.total = self.total + counts
        self.calls += 1
        avg = self.total / self.calls
        self.keys.append(key.detach())
        self.saved.append(torch.cat([avg, num_tokens.reshape(1)]))
        self.used = torch.cat([self.used, self.used.new_zeros(1)])
        return avg, num_tokens

    def replay(self, key: torch.Tensor):
        far = (torch.stack(self.keys) - key.detach()).abs().sum(1).masked_fill(self.used, float("inf"))
        pick = torch.argmin(far)
        self.used[pick] = True
        row = torch.stack(self.saved)[pick]
        return row[:-1], row[-1]


def token_split_group(sequence_parallel: bool):
    """The ranks holding other pieces of this micro-batch's tokens: tp under sequence parallelism (without it tp
    ranks hold the same tokens) and cp. Not ep: it carves dp x cp, each ep rank routes its own tokens (its cp piece
    of its own micro-batch), whose other pieces are on its cp peers."""
    cp = ps.get_context_parallel_world_size() > 1
    if not dist.is_initialized() or not (sequence_parallel or cp):
        return None
    if sequence_parallel and cp:
        return ps.get_tensor_and_context_parallel_group()
    return ps.get_tensor_model_parallel_group() if sequence_parallel else ps.get_context_parallel_group()


def aux_losses(moe, layer_number: int, logits, scores, top_i, batch: int, sequence_parallel: bool,
               tracker: GlobalTokenTracker) -> torch.Tensor:
    """This rank's share of the load-balancing (``moe.load_balancing_type``) + z loss of one micro-batch; records
    the micro-batch's statistics for the log line. logits/scores [b*s_local, E] laid out [b, s], top_i [b*s, k]."""
    E, k, kind = moe.num_experts, moe.topk, moe.load_balancing_type
    per_seq = kind == "seq_aux_loss"
    groups = batch if per_seq else 1  # statistics per sequence, or one set for the micro-batch
    # Megatron counts a plain top-k of the scores for the loss, not the group-limited or bias-shifted routing; the
    # log line's loads stay the routed ones
    plain = torch.topk(scores.detach(), k, dim=-1).indices if moe.num_groups or moe.enable_expert_bias else top_i
    ids = plain.view(groups, -1) + E * torch.arange(groups, device=top_i.device)[:, None]
    counts = expert_counts(ids, groups * E).to(scores.dtype).view(groups, E)
    psum = scores.view(groups, -1, E).sum(1)
    lse2 = torch.logsumexp(logits, dim=-1).square().sum()
    # tokens per statistics group, as a device fill: a host-to-device copy would synchronise the GPU in every layer
    n = torch.full((1,), logits.shape[0] // groups, dtype=scores.dtype, device=logits.device)
    routed = [] if plain is top_i else [expert_counts(top_i.reshape(-1), E).to(scores.dtype)]
    stats = torch.cat([counts.reshape(-1), psum.detach().reshape(-1), n, lse2.detach().to(scores.dtype)[None]]
                      + routed)
    group = token_split_group(sequence_parallel)
    if group is not None:
        dist.all_reduce(stats, group=group)
    m = groups * E
    counts_mb, psum_mb, n_mb, lse2_mb = stats[:m].view(groups, E), stats[m:2 * m].view(groups, E), stats[2 * m], \
        stats[2 * m + 1]
    loads = stats[2 * m + 2:] if routed else counts_mb.sum(0)
    c, zc, cp = moe.aux_loss_coeff, moe.z_loss_coeff, ps.get_context_parallel_world_size()
    if kind == "none":  # no load-balancing term, whatever the coefficient (the z-loss stays)
        c = 0.0
    if kind == "global_aux_loss":
        key = stats[:2 * m + 1]
        if _in_backward():  # a recompute: the average its forward used, no collective
            avg, n_all = tracker.replay(key)
            psum_all = psum_mb  # (the log line is recorded in the forward only)
        else:
            joint = key.clone()
            if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
                dist.all_reduce(joint, group=ps.get_data_parallel_group())
            psum_all = joint[E:2 * E]
            avg, n_all = tracker.update(key, joint[:E], joint[2 * E])
        aux = cp * load_balancing_loss(psum, avg, n_all, k, c)
        logged = load_balancing_loss(psum_all, avg, n_all, k, c)
    else:
        aux = cp * load_balancing_loss(psum, counts_mb, n_mb, k, c) / groups
        logged = load_balancing_loss(psum_mb, counts_mb, n_mb, k, c) / groups
    tokens_mb = n_mb * groups
    zl = cp * zc * lse2 / tokens_mb
    if torch.is_grad_enabled():
        get_moe_stats().record(layer_number, loads, logged, zc * lse2_mb / tokens_mb)
    return aux + zl
