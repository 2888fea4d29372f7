"""Mixture-of-experts feed-forward: top-k softmax router, load-balancing and z losses, grouped SwiGLU experts,
expert parallelism, optional capacity factor.

``MoELayer`` is a drop-in for ``LlamaMLP`` (same input/output layout, incl. [b, s/tp, h] under sequence
parallelism). Tensor parallelism shards every expert like the dense MLP (gate/up by output, down by input
features) and wraps the expert computation in the same conjugate mappings. Expert parallelism splits the experts
over ``parallel_state.get_expert_model_parallel_group()`` and moves tokens with all-to-all
(``moe_dispatch``).

Auxiliary losses never touch the returned LM loss: they are attached to the layer's output with
``_AttachAuxLoss`` (Megatron's ``MoEAuxLossAutoScaler``) so their gradient flows in the same backward on any
pipeline stage. The load-balancing loss is Megatron's default ``aux_loss``: one per micro-batch, its routing
statistics (tokens per expert, token count) reduced over exactly the ranks that hold pieces of that micro-batch's
tokens (tensor-parallel under sequence parallelism, context-parallel), never over dp or ep, whose ranks hold other
micro-batches. So the loss does not depend on the data-parallel size: any dp/ep/tp/cp layout with the same
micro-batch size and global batch equals the one-process run (a resume under another dp size continues the curve).
Megatron's ``global_aux_loss`` (statistics of the whole global batch) is not offered: the gradient of micro-batch
i needs the counts of micro-batches not yet run, which Megatron only approximates with a running average.

Expert parameters carry ``expert_parallel = True`` and ``allreduce = False``: their gradient is already summed
over the ep group by the all-to-all backward, so the data-parallel reduction must run over
``get_expert_data_parallel_group()`` only (sum, scaled by 1/dp like every other gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megallama.errors import ConfigError
from megallama.mpu import mappings
from megallama.mpu import parallel_state as ps
from megallama.mpu.random import _name_seed
from megallama.model.moe_dispatch import expert_counts, grouped_matmul, sort_by_expert
from megallama.model.moe_stats import get_moe_stats
from megallama.ops import swiglu


@dataclass
class MoEConfig:
    num_experts: int = 8
    topk: int = 2
    ffn_hidden_size: Optional[int] = None  # per expert; default the dense FFN size
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None  # None: no token dropping
    norm_topk_prob: bool = True  # renormalise the k chosen probabilities (Mixtral); k = 1 keeps p (Switch)
    layers: Optional[List[int]] = None  # global decoder-layer indices that are sparse; None: every layer

    def validate(self, num_layers: Optional[int] = None) -> "MoEConfig":
        if self.num_experts < 1:
            raise ConfigError(f"--num-experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.topk <= self.num_experts:
            raise ConfigError(f"--moe-router-topk {self.topk} must be between 1 and --num-experts "
                              f"{self.num_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"--moe-capacity-factor must be positive, got {self.capacity_factor}")
        if num_layers is not None and self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"--moe-layers {bad[0]} is out of range for {num_layers} layers; use indices "
                                  f"0..{num_layers - 1}")
        return self


def moe_layer_ids(num_layers: int, layers: Optional[Sequence[int]] = None, freq: int = 1) -> List[int]:
    """Sparse layers: an explicit list of global indices, else every ``freq``-th (Megatron's --moe-layer-freq)."""
    if layers is not None:
        return sorted(set(int(i) for i in layers))
    if freq < 1:
        raise ConfigError(f"--moe-layer-freq must be >= 1, got {freq}")
    return [i for i in range(num_layers) if i % freq == 0]


# ---------------------------------------------------------------- routing
def topk_routing(logits: torch.Tensor, k: int, norm_topk_prob: bool = True):
    """logits [T, E] (fp32) -> (probs [T, E], top_p [T, k], top_i [T, k])."""
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = torch.topk(probs, k, dim=-1)
    if k > 1 and norm_topk_prob:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return probs, top_p, top_i


def load_balancing_loss(probs_sum: torch.Tensor, tokens_per_expert: torch.Tensor, num_tokens, topk: int,
                        coeff: float) -> torch.Tensor:
    """Switch/GShard loss ``coeff * E * sum_e f_e * P_e`` with f_e = tokens_per_expert / (T k) (fraction of the
    T*k assignments) and P_e = probs_sum / T (mean router probability). Equals ``coeff`` for a uniform router."""
    E = probs_sum.shape[-1]
    # a tensor count stays on the device: float() would synchronise the GPU in every MoE layer's forward
    n = num_tokens.to(torch.float32) if isinstance(num_tokens, torch.Tensor) else float(num_tokens)
    return coeff * E / (n * n * topk) * (tokens_per_expert * probs_sum).sum()


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: coeff * mean_t logsumexp(logits_t)^2."""
    return coeff * torch.logsumexp(logits, dim=-1).square().mean()


_AUX_GRAD_SCALE = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """Gradient scale of the attached aux losses: 1/num_microbatches (times the fp16 loss scale), matching what
    the schedule applies to the LM loss."""
    global _AUX_GRAD_SCALE
    _AUX_GRAD_SCALE = float(scale)


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


# ---------------------------------------------------------------- modules
class TopKRouter(nn.Module):
    """Linear gate [E, h], replicated over tp and ep; computed in fp32."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float, sequence_parallel: bool, device=None,
                 dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        self.weight.init_std = init_std
        self.weight.sequence_parallel = sequence_parallel  # sees only this rank's tokens under SP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class GroupedExperts(nn.Module):
    """This rank's experts as stacked SwiGLU weights [E_local, f/tp, h] (gate, up) and [E_local, h, f/tp] (down)."""

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float,
                 out_std: float, device=None, dtype=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        if ffn_hidden_size % tp:
            raise ConfigError(f"MoE FFN size {ffn_hidden_size} is not divisible by the tensor-parallel size {tp}; "
                              "choose --tensor-model-parallel-size dividing it")
        f = ffn_hidden_size // tp
        self.num_local_experts = num_local_experts
        self.gate_proj = nn.Parameter(torch.empty(num_local_experts, f, hidden_size, device=device, dtype=dtype))
        self.up_proj = nn.Parameter(torch.empty(num_local_experts, f, hidden_size, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, hidden_size, f, device=device, dtype=dtype))
        for p, dim, std in ((self.gate_proj, 1, init_std), (self.up_proj, 1, init_std), (self.down_proj, 2, out_std)):
            p.tensor_model_parallel, p.partition_dim = tp > 1, dim
            p.expert_parallel, p.allreduce, p.expert_partition_dim = True, False, 0
            p.init_std = std

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, h] rows grouped by local expert (``counts`` rows each) -> [N, h] (partial sums under tp)."""
        ws = (self.gate_proj, self.up_proj, self.down_proj)
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, ws = x.to(dt), tuple(w.to(dt) for w in ws)
        else:
            ws = tuple(w.to(x.dtype) for w in ws)
        with torch.autocast(x.device.type, enabled=False):
            act = swiglu(grouped_matmul(x, ws[0], counts), grouped_matmul(x, ws[1], counts))
            return grouped_matmul(act, ws[2], counts)

    @torch.no_grad()
    def init_weights(self, prefix: str, seed: int) -> None:
        """Layout-independent: expert e's full [f, h] matrix is drawn from (seed, name, global e), then this tp
        rank's slice is kept, so any ep x tp split holds the same experts."""
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        first = ps.get_expert_model_parallel_rank() * self.num_local_experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(self, name)
            dim = p.partition_dim - 1
            for i in range(self.num_local_experts):
                shape = list(p.shape[1:])
                shape[dim] *= tp
                gen = torch.Generator().manual_seed(_name_seed(seed, f"{prefix}.{name}.{first + i}"))
                full = torch.empty(shape).normal_(0.0, p.init_std, generator=gen)
                p[i].copy_(full.chunk(tp, dim=dim)[tp_rank].to(p.dtype))


class MoELayer(nn.Module):
    """Sparse SwiGLU FFN: route each token to ``topk`` of ``num_experts`` experts, weight their outputs by the
    router probabilities. Input/output layout as ``LlamaMLP``."""

    def __init__(self, config, moe: MoEConfig, layer_number: int, sequence_parallel: bool = False, device=None,
                 dtype=None):
        super().__init__()
        moe.validate()
        ep = ps.get_expert_model_parallel_world_size()
        if moe.num_experts % ep:
            raise ConfigError(f"--num-experts {moe.num_experts} is not divisible by --expert-model-parallel-size "
                              f"{ep}; pick an expert-parallel size dividing the number of experts")
        self.moe, self.layer_number = moe, layer_number
        self.num_experts, self.topk = moe.num_experts, moe.topk
        self.num_local_experts = moe.num_experts // ep
        self.hidden_size = config.hidden_size
        self.sequence_parallel = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        out_std = config.init_method_std / (2.0 * config.num_layers) ** 0.5
        self.router = TopKRouter(config.hidden_size, moe.num_experts, config.init_method_std, self.sequence_parallel,
                                 device, dtype)
        self.experts = GroupedExperts(self.num_local_experts, config.hidden_size,
                                      moe.ffn_hidden_size or config.ffn_hidden_size, config.init_method_std, out_std,
                                      device, dtype)

    # ---- auxiliary losses of one micro-batch
    def _token_split_group(self):
        """The ranks holding other pieces of this micro-batch's tokens: tp under sequence parallelism (without it
        tp ranks hold the same tokens) and cp. Not ep: it carves dp, each ep rank routes its own micro-batch."""
        sp, cp = self.sequence_parallel, ps.get_context_parallel_world_size() > 1
        if not dist.is_initialized() or not (sp or cp):
            return None
        if sp and cp:
            return ps.get_tensor_and_context_parallel_group()
        return ps.get_tensor_model_parallel_group() if sp else ps.get_context_parallel_group()

    def _aux_losses(self, logits, probs, top_i):
        """Load-balancing + z loss of this micro-batch (Megatron's ``aux_loss``), this rank's share of it.

        Counts and token totals are summed over the micro-batch's token-split ranks (not differentiated); the
        differentiable sums (router probabilities, logsumexp^2) stay local, so the shares add up to the loss:
        tp shares are summed by the sequence-parallel gradient all-reduce, cp shares are averaged by the dp x cp
        gradient mean (hence the factor cp, as ``cp_mean_loss`` gives the LM loss)."""
        E, k = self.num_experts, self.topk
        counts = expert_counts(top_i, E).to(torch.float32)
        lse2 = torch.logsumexp(logits, dim=-1).square().sum()
        # the token count as a device fill: a host-to-device copy of it would synchronise the GPU in every layer
        n = torch.full((1,), logits.shape[0], dtype=torch.float32, device=logits.device)
        stats = torch.cat([counts, probs.detach().sum(0), n, lse2.detach()[None]])
        group = self._token_split_group()
        if group is not None:
            dist.all_reduce(stats, group=group)
        counts_mb, psum_mb, n_mb, lse2_mb = stats[:E], stats[E:2 * E], stats[2 * E], stats[2 * E + 1]
        c, zc = self.moe.aux_loss_coeff, self.moe.z_loss_coeff
        cp = ps.get_context_parallel_world_size()
        aux = cp * load_balancing_loss(probs.sum(0), counts_mb, n_mb, k, c)
        zl = cp * zc * lse2 / n_mb
        if torch.is_grad_enabled():
            get_moe_stats().record(self.layer_number, counts_mb,
                                   load_balancing_loss(psum_mb, counts_mb, n_mb, k, c), zc * lse2_mb / n_mb)
        return aux + zl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, h = x.shape, self.hidden_size
        logits = self.router(x.reshape(-1, h))
        probs, top_p, top_i = topk_routing(logits, self.topk, self.moe.norm_topk_prob)
        aux = self._aux_losses(logits, probs, top_i) if torch.is_grad_enabled() else None
        if self.sequence_parallel:  # route locally, compute experts on the gathered sequence (as the dense MLP)
            b = shape[0]
            x_full = mappings.gather_from_sequence_parallel_region(x, True).reshape(-1, h)
            top_p = mappings.gather_from_sequence_parallel_region(top_p.view(b, -1, self.topk), True)
            top_i = mappings.gather_from_sequence_parallel_region(top_i.view(b, -1, self.topk), False)
            top_p, top_i = top_p.reshape(-1, self.topk), top_i.reshape(-1, self.topk)
        else:
            x_full = mappings.copy_to_tensor_model_parallel_region(x.reshape(-1, h))
            top_p = mappings.copy_to_tensor_model_parallel_region(top_p)
        y = self._experts(x_full, top_p, top_i)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y.view(shape[0], -1, h))
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y)
        y = y.reshape(shape)
        if aux is not None and aux.requires_grad:
            y = _AttachAuxLoss.apply(y, aux)
        return y

    def capacity(self, num_tokens: int) -> Optional[int]:
        cf = self.moe.capacity_factor
        return None if cf is None else max(1, math.ceil(cf * num_tokens * self.topk / self.num_experts))

    def _experts(self, x, top_p, top_i):
        """Dispatch -> (all-to-all) -> grouped experts -> (all-to-all) -> probability-weighted combine."""
        T, k = x.shape[0], self.topk
        order, counts = sort_by_expert(top_i.reshape(-1), self.num_experts, self.capacity(T))
        tok = order // k
        x_perm = x[tok]
        ep = ps.get_expert_model_parallel_world_size()
        if ep == 1:
            out = self.experts(x_perm, counts)
        else:
            group, El = ps.get_expert_model_parallel_group(), self.num_local_experts
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts, group=group)  # [src rank, my local expert]
            send_splits = counts.view(ep, El).sum(1).tolist()
            recv = recv.view(ep, El)
            recv_splits = recv.sum(1).tolist()
            x_recv = mappings.all_to_all(x_perm, group, recv_splits, send_splits)
            local_e = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep), recv.reshape(-1),
                                              output_size=x_recv.shape[0])
            perm = torch.argsort(local_e, stable=True)
            out = self.experts(x_recv[perm], recv.sum(0))
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            out = mappings.all_to_all(out[inv], group, send_splits, recv_splits)
        w = top_p.reshape(-1)[order].to(out.dtype)
        return out.new_zeros(T, out.shape[-1]).index_add(0, tok, out * w[:, None])

    @torch.no_grad()
    def init_weights(self, prefix: str, seed: int) -> None:
        from megallama.mpu.random import init_parameter
        init_parameter(self.router.weight, f"{prefix}.router.weight", seed, self.router.weight.init_std)
        self.experts.init_weights(f"{prefix}.experts", seed)

    @torch.no_grad()
    def upcycle_from(self, dense) -> None:
        """Sparse upcycling: every expert starts as a copy of the dense MLP (``LlamaMLP``, same tp shards)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self.experts, name).copy_(getattr(dense, name).weight.unsqueeze(0).expand_as(
                getattr(self.experts, name)))
