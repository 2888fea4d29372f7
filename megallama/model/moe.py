"""Mixture-of-experts feed-forward: top-k router, load-balancing and z losses, grouped SwiGLU experts, an optional
shared expert, expert parallelism, optional expert capacity.

``MoELayer`` is a drop-in for ``LlamaMLP`` (same input/output layout, incl. [b, s/tp, h] under sequence
parallelism). Tensor parallelism shards every expert like the dense MLP (gate/up by output, down by input
features) and wraps the expert computation in the same conjugate mappings. Expert parallelism splits the experts
over ``parallel_state.get_expert_model_parallel_group()`` and moves tokens with all-to-all (``moe_dispatch``).
Routing options are in ``moe_router``, the auxiliary losses (``aux_loss``, ``seq_aux_loss``, ``global_aux_loss``)
and how they reach the gradient in ``moe_aux_loss``.

``--moe-shared-expert-intermediate-size`` adds a dense SwiGLU MLP of that size which every token goes through
(``shared_experts``, a ``LlamaMLP``: tensor-parallel like the dense MLP, data-parallel like every dense weight),
its output added to the routed experts' (Megatron's ``SharedExpertMLP``; ``--moe-shared-expert-gate`` scales it by
a per-token sigmoid gate, ``shared_experts.py``).

Expert capacity (``--moe-expert-capacity-factor``) is Megatron's ``ceil((T * k / E) * cf)`` over the T tokens of
the micro-batch this rank routes: gathered over tp under sequence parallelism (Megatron counts each tp rank's s/tp
slice, so its drops change with tp; here they do not), this rank's piece of the sequence under cp (as Megatron).
Each expert keeps its assignments in ``--moe-token-drop-policy`` order (``moe_dispatch.drop_preference``).

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

from megallama.errors import ConfigError
from megallama.mpu import mappings
from megallama.mpu import parallel_state as ps
from megallama.mpu.random import _name_seed
from megallama.model.moe_aux_loss import (LOAD_BALANCING_TYPES, GlobalTokenTracker, attach_aux_loss,  # noqa: F401
                                          aux_losses, load_balancing_loss, set_aux_loss_scale, z_loss)
from megallama.model.moe_dispatch import drop_preference, grouped_matmul, padded_slots, sort_by_expert
from megallama.model.moe_router import (ROUTER_DTYPES, SCORE_FUNCTIONS, TopKRouter, check_router_options,  # noqa: F401
                                        topk_routing)
from megallama.ops import swiglu


@dataclass
class MoEConfig:
    num_experts: int = 8
    topk: int = 2
    ffn_hidden_size: Optional[int] = None  # per expert; default the dense FFN size
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None  # None: no token dropping
    norm_topk_prob: bool = True  # softmax over the k chosen logits (default); False: --moe-router-pre-softmax
    layers: Optional[List[int]] = None  # global decoder-layer indices that are sparse; None: every layer
    score_function: str = "softmax"  # or sigmoid
    topk_scaling_factor: Optional[float] = None
    router_dtype: str = "fp32"  # or fp64
    load_balancing_type: str = "aux_loss"  # seq_aux_loss, global_aux_loss, none
    drop_policy: str = "probs"  # or position
    pad_to_capacity: bool = False
    shared_expert_intermediate_size: Optional[int] = None
    shared_expert_overlap: bool = False  # accepted: one stream here, the output is the same
    shared_expert_gate: bool = False  # --moe-shared-expert-gate: sigmoid(x . w) times the shared expert's output
    upcycle_shared_expert: bool = False  # upcycling also copies the dense MLP into the shared expert
    num_groups: Optional[int] = None  # --moe-router-num-groups: device-limited routing (moe_router)
    group_topk: Optional[int] = None  # --moe-router-group-topk
    enable_expert_bias: bool = False  # --moe-router-enable-expert-bias: aux-loss-free balancing (moe_expert_bias)
    bias_update_rate: Optional[float] = None  # --moe-router-bias-update-rate (None: Megatron's 1e-3)

    @property
    def router_pre_softmax(self) -> bool:
        """Megatron's --moe-router-pre-softmax (checkpoint compatibility names it so)."""
        return not self.norm_topk_prob

    def validate(self, num_layers: Optional[int] = None) -> "MoEConfig":
        if self.num_experts < 1:
            raise ConfigError(f"--num-experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.topk <= self.num_experts:
            raise ConfigError(f"--moe-router-topk {self.topk} must be between 1 and --num-experts "
                              f"{self.num_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:  # (a negative Megatron one is None here)
            raise ConfigError(f"--moe-expert-capacity-factor must be positive (or negative for no capacity, as "
                              f"Megatron's), got {self.capacity_factor}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            raise ConfigError(f"--moe-ffn-hidden-size must be positive, got {self.ffn_hidden_size}; leave it out for "
                              "experts of the dense FFN size")
        choices = {"score_function": SCORE_FUNCTIONS, "router_dtype": tuple(ROUTER_DTYPES),
                   "load_balancing_type": LOAD_BALANCING_TYPES, "drop_policy": ("probs", "position")}
        flags = {"score_function": "--moe-router-score-function", "router_dtype": "--moe-router-dtype",
                 "load_balancing_type": "--moe-router-load-balancing-type", "drop_policy": "--moe-token-drop-policy"}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{flags[key]} {getattr(self, key)} is not one of {', '.join(allowed)}")
        if not self.norm_topk_prob and self.score_function != "softmax":
            raise ConfigError("--moe-router-pre-softmax applies to --moe-router-score-function softmax only; drop it "
                              "(sigmoid scores are taken per expert, before the top-k, anyway)")
        if self.topk_scaling_factor is not None and self.topk_scaling_factor <= 0:
            raise ConfigError(f"--moe-router-topk-scaling-factor must be positive, got {self.topk_scaling_factor}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor; add it or drop "
                              "the padding")
        check_router_options(self)
        if self.shared_expert_intermediate_size is not None and self.shared_expert_intermediate_size <= 0:
            raise ConfigError(f"--moe-shared-expert-intermediate-size must be positive, got "
                              f"{self.shared_expert_intermediate_size}")
        if self.shared_expert_overlap and not self.shared_expert_intermediate_size:
            raise ConfigError("--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size (there is no "
                              "shared expert to overlap)")
        if (self.shared_expert_gate or self.upcycle_shared_expert) and not self.shared_expert_intermediate_size:
            flag = "--moe-shared-expert-gate" if self.shared_expert_gate else "--moe-upcycle-shared-expert"
            raise ConfigError(f"{flag} needs --moe-shared-expert-intermediate-size (there is no shared expert); add "
                              f"it or drop {flag}")
        if num_layers is not None and self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"--moe-layers {bad[0]} is out of range for {num_layers} layers; use indices "
                                  f"0..{num_layers - 1}")
        return self


def moe_layer_ids(num_layers: int, layers: Optional[Sequence[int]] = None, freq=1) -> List[int]:
    """Sparse layers: an explicit list of global indices, else every ``freq``-th (Megatron's --moe-layer-freq), or
    where Megatron's 0/1 pattern (a list, one entry per layer) has a 1."""
    if layers is not None:
        return sorted(set(int(i) for i in layers))
    if isinstance(freq, (list, tuple)):
        if len(freq) != num_layers or any(v not in (0, 1) for v in freq):
            raise ConfigError(f"--moe-layer-freq's pattern has {len(freq)} entries for {num_layers} layers (each 0 "
                              "or 1); give one 0/1 per layer, such as ([0]*1+[1]*N)")
        return [i for i, v in enumerate(freq) if v]
    if freq < 1:
        raise ConfigError(f"--moe-layer-freq must be >= 1, got {freq}")
    return [i for i in range(num_layers) if i % freq == 0]


# ---------------------------------------------------------------- modules
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
        self.recompute_activation = False  # --recompute-modules moe_act: the SwiGLU output is rebuilt in backward

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, h] rows grouped by local expert (``counts`` rows each) -> [N, h] (partial sums under tp)."""
        ws = (self.gate_proj, self.up_proj, self.down_proj)
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, ws = x.to(dt), tuple(w.to(dt) for w in ws)
        else:
            ws = tuple(w.to(x.dtype) for w in ws)
        with torch.autocast(x.device.type, enabled=False):
            gate, up = grouped_matmul(x, ws[0], counts), grouped_matmul(x, ws[1], counts)
            if not (self.recompute_activation and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
                return grouped_matmul(swiglu(gate, up), ws[2], counts)
            from megallama.model.recompute import CheckpointWithoutOutput
            ck = CheckpointWithoutOutput()
            out = grouped_matmul(ck.checkpoint(swiglu, gate, up), ws[2], counts)
            ck.discard_output_and_register_recompute(out)
            return out

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
    router probabilities (plus the shared expert, if any). Input/output layout as ``LlamaMLP``."""

    def __init__(self, config, moe: MoEConfig, layer_number: int, sequence_parallel: bool = False, device=None,
                 dtype=None):
        super().__init__()
        moe.validate()
        ep, tp = ps.get_expert_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        if moe.num_experts % ep:
            raise ConfigError(f"--num-experts {moe.num_experts} is not divisible by --expert-model-parallel-size "
                              f"{ep}; pick an expert-parallel size dividing the number of experts")
        self.moe, self.layer_number = moe, layer_number
        self.num_experts, self.topk = moe.num_experts, moe.topk
        self.num_local_experts = moe.num_experts // ep
        self.hidden_size = config.hidden_size
        self.sequence_parallel = sequence_parallel and tp > 1
        out_std = config.init_method_std / (2.0 * config.num_layers) ** 0.5
        self.router = TopKRouter(config.hidden_size, moe.num_experts, config.init_method_std, self.sequence_parallel,
                                 device, dtype, router_dtype=moe.router_dtype, moe=moe)
        self.experts = GroupedExperts(self.num_local_experts, config.hidden_size,
                                      moe.ffn_hidden_size or config.ffn_hidden_size, config.init_method_std, out_std,
                                      device, dtype)
        self.shared_experts = None
        if moe.shared_expert_intermediate_size:
            from megallama.model.shared_experts import SharedExpertMLP
            if moe.shared_expert_intermediate_size % tp:
                raise ConfigError(f"--moe-shared-expert-intermediate-size {moe.shared_expert_intermediate_size} is "
                                  f"not divisible by the tensor-parallel size {tp}; choose a size divisible by it")
            self.shared_experts = SharedExpertMLP(config, self.sequence_parallel, device, dtype,
                                                  ffn_hidden_size=moe.shared_expert_intermediate_size,
                                                  gate=moe.shared_expert_gate)
        self.global_tokens = GlobalTokenTracker()
        self.recompute_shared_experts = False  # --recompute-modules shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, h, moe = x.shape, self.hidden_size, self.moe
        logits = self.router(x.reshape(-1, h))
        scores, top_p, top_i = self.router.route(logits, self.topk)
        aux = None
        if torch.is_grad_enabled():
            aux = aux_losses(moe, self.layer_number, logits, scores, top_i, shape[0], self.sequence_parallel,
                             self.global_tokens)
        if self.sequence_parallel:  # route locally, compute experts on the gathered sequence (as the dense MLP)
            b = shape[0]
            x_full = mappings.gather_from_sequence_parallel_region(x, True).reshape(-1, h)
            top_p = mappings.gather_from_sequence_parallel_region(top_p.view(b, -1, self.topk), True)
            top_i = mappings.gather_from_sequence_parallel_region(top_i.view(b, -1, self.topk), False)
            top_p, top_i = top_p.reshape(-1, self.topk), top_i.reshape(-1, self.topk)
        else:
            x_full = mappings.copy_to_tensor_model_parallel_region(x.reshape(-1, h))
            top_p = mappings.copy_to_tensor_model_parallel_region(top_p)
        y = self._experts(x_full, top_p, top_i, shape[0])
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y.view(shape[0], -1, h))
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y)
        y = y.reshape(shape)
        if self.shared_experts is not None:
            from megallama.model.recompute import checkpointed
            y = y + (checkpointed(self.shared_experts, x) if self.recompute_shared_experts else self.shared_experts(x))
        if aux is not None and aux.requires_grad:
            y = attach_aux_loss(y, aux)
        return y

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Megatron's ``get_capacity(T * k, E, cf)``, in its order of operations: ``cf * T * k / E`` rounds
        differently (cf 1.1, T 50, k 6, E 2: 166 instead of Megatron's 165) and would drop other tokens."""
        cf = self.moe.capacity_factor
        return None if cf is None else max(1, math.ceil((num_tokens * self.topk / self.num_experts) * cf))

    def _dispatch(self, top_p, top_i, batch):
        """(order, counts): kept (token, choice) assignments sorted by expert and rows per expert, capacity and
        drop policy applied."""
        T = top_i.shape[0]
        cap = self.capacity(T)
        pref = drop_preference(top_p, batch, self.moe.drop_policy) if cap is not None and cap < T else None
        return sort_by_expert(top_i.reshape(-1), self.num_experts, cap if pref is not None else None, pref)

    def _experts(self, x, top_p, top_i, batch):
        """Dispatch -> (all-to-all) -> grouped experts -> (all-to-all) -> probability-weighted combine."""
        T, k = x.shape[0], self.topk
        order, counts = self._dispatch(top_p, top_i, batch)
        tok = order // k
        x_perm = x[tok]
        w = top_p.reshape(-1)[order]
        if self.moe.pad_to_capacity:  # every expert gets exactly min(capacity, T) rows; the padding weighs 0
            size = min(self.capacity(T), T)
            slots = padded_slots(counts, size)
            rows = self.num_experts * size
            x_perm = x_perm.new_zeros(rows, x.shape[-1]).index_copy(0, slots, x_perm)
            tok = tok.new_zeros(rows).index_copy(0, slots, tok)
            w = w.new_zeros(rows).index_copy(0, slots, w)
            counts = torch.full_like(counts, size)
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
        return out.new_zeros(T, out.shape[-1]).index_add(0, tok, out * w.to(out.dtype)[:, None])

    @torch.no_grad()
    def init_weights(self, prefix: str, seed: int) -> None:
        from megallama.mpu.random import init_parameter
        init_parameter(self.router.weight, f"{prefix}.router.weight", seed, self.router.weight.init_std)
        self.experts.init_weights(f"{prefix}.experts", seed)
        if self.shared_experts is not None:  # named as in the model: any tp split draws the same full weights
            for name, p in self.shared_experts.named_parameters():
                init_parameter(p, f"{prefix}.shared_experts.{name}", seed, p.init_std)

    @torch.no_grad()
    def upcycle_from(self, dense) -> None:
        """Sparse upcycling: every expert starts as a copy of the dense MLP (``LlamaMLP``, same tp shards).

        The shared expert keeps its fresh init, as Megatron's ``upcycle_state_dict`` leaves it (it copies the dense
        ``mlp.linear_fc1/fc2`` into the routed experts only): with the routed weights summing to 1, the routed
        output already equals the dense MLP's, and a copy in the shared expert too would double the FFN output.
        ``--moe-upcycle-shared-expert`` copies it all the same (same FFN size needed)."""
        tp = ps.get_tensor_model_parallel_world_size()
        dense_f, expert_f = dense.gate_proj.weight.shape[0] * tp, self.experts.gate_proj.shape[1] * tp
        if dense_f != expert_f:  # a copy needs the same shape: refuse here, not in a broadcast traceback
            raise ConfigError(f"upcycling (--moe-upcycle, or MoE from a dense --pretrained-checkpoint) copies the "
                              f"dense MLP (FFN size {dense_f}) into every expert, but --moe-ffn-hidden-size is "
                              f"{expert_f}; drop --moe-ffn-hidden-size (or set it to {dense_f}) or drop --moe-upcycle")
        shared_f = self.moe.shared_expert_intermediate_size
        if self.moe.upcycle_shared_expert and shared_f != dense_f:
            raise ConfigError(f"--moe-upcycle-shared-expert copies the dense MLP (FFN size {dense_f}) into the shared "
                              f"expert, but --moe-shared-expert-intermediate-size is {shared_f}; set it to {dense_f} "
                              "or drop --moe-upcycle-shared-expert (the shared expert then starts fresh)")
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self.experts, name).copy_(getattr(dense, name).weight.unsqueeze(0).expand_as(
                getattr(self.experts, name)))
            if self.moe.upcycle_shared_expert:
                getattr(self.shared_experts, name).weight.copy_(getattr(dense, name).weight)
