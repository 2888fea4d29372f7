"""LoRA: low-rank adapters on the tensor-parallel projections, frozen base, merge/unmerge, adapter-only files.

``y = W x + (alpha / r) * B A dropout(x)`` with A [r, d_in] and B [d_out, r] (B starts at zero). Under tensor
parallelism the adapter follows its base layer's split:

* ColumnParallelLinear (q/k/v, gate/up): A replicated, B sharded by output rows like W. The rank-r activation
  ``A x`` enters the TP region (copy: backward all-reduces its [.., r] gradient), or is all-gathered along the
  sequence under SP (backward reduce-scatter), so A's gradient is complete on every rank.
* RowParallelLinear (o_proj, down_proj): A sharded by input columns like W, B replicated. ``A_i x_i`` is a
  partial sum that is all-reduced (reduce-scattered under SP) over tp before B.

Every reduction a LoRA parameter needs happens inside autograd, so it needs no post-backward hook; adapters
carry ``tensor_model_parallel`` / ``partition_dim`` like the base weights, so layout-independent init and
checkpoint resharding treat them the same way.

An adapted layer keeps its base parameter under the same name (``q_proj.weight``; the adapters are
``q_proj.lora_A.weight`` / ``q_proj.lora_B.weight``, PEFT's names), so dense checkpoints load unchanged. Code
that reads ``layer.weight`` directly instead of calling the layer (the fused q/k/v and gate/up path in
``mpu.layers.column_parallel_linears``) gets the effective weight ``W + (alpha/r) B A`` as a differentiable
tensor: exact, but it computes the full weight gradient and cannot apply ``lora_dropout``. A fused path that
wants the cheap adapter path calls ``layer.adapter_forward(x)`` and uses ``layer.base_weight`` when
``layer.lora_active``. (With bf16 weights the effective weight also rounds away adapter updates smaller than
half a bf16 ulp of W, which the separate adapter path keeps.)
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megallama.errors import ConfigError
from megallama.mpu import mappings
from megallama.mpu import parallel_state as ps
from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, autocast_copies
from megallama.mpu.random import init_parameter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> "LoRAConfig":
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        if bad or not self.target_modules:
            raise ConfigError(f"--lora-target-modules {bad[0] if bad else '(empty)'} is not a LoRA target; choose "
                              f"from {', '.join(LORA_TARGETS)}")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAMatrix(nn.Module):
    """Holds one adapter matrix as ``.weight`` so names match PEFT (``lora_A.weight``)."""

    def __init__(self, out_features: int, in_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))


class _LoRAMixin:
    """Shared by the column and row variants; instances are created by ``_adapt`` from a built base layer."""

    lora_rank: int
    lora_scaling: float
    merged: bool

    @property
    def base_weight(self) -> nn.Parameter:
        return self._parameters["weight"]

    @property
    def lora_active(self) -> bool:
        """True while the adapter is separate: a fused path then uses ``base_weight`` + ``adapter_forward(x)``."""
        return not self.merged

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight for callers that read it instead of calling the layer."""
        w = self._parameters["weight"]
        if self.merged or self._calling_base:
            return w
        if self.training and self.lora_dropout_p > 0 and not self._warned:
            warnings.warn("lora_dropout is not applied where a fused path reads the effective weight of "
                          f"{type(self).__name__} directly", stacklevel=2)
            self._warned = True
        return w + self.lora_scaling * self._delta_weight()

    @contextlib.contextmanager
    def _base(self):
        self._calling_base = True
        try:
            yield
        finally:
            self._calling_base = False

    def _dropout(self, x):
        return F.dropout(x, self.lora_dropout_p, self.training) if self.lora_dropout_p > 0 else x

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_weight.add_((self.lora_scaling * self._delta_weight(local=True)).to(self.base_weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_weight.sub_((self.lora_scaling * self._delta_weight(local=True)).to(self.base_weight.dtype))
            self.merged = False

    def extra_repr(self):
        return super().extra_repr() + f", lora_rank={self.lora_rank}, lora_scaling={self.lora_scaling:g}"


class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
    def _delta_weight(self, local: bool = False):
        A = self.lora_A.weight if local else mappings.copy_to_tensor_model_parallel_region(self.lora_A.weight)
        return self.lora_B.weight @ A  # [d_out/tp, r] @ [r, d_in]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B_i A x for the base layer's input layout (replicated, or [b, s/tp, h] under SP)."""
        if self.sequence_parallel:
            A = mappings.copy_to_tensor_model_parallel_region(self.lora_A.weight)  # sees local tokens only
            u = mappings.gather_from_sequence_parallel_region(F.linear(self._dropout(x), A), True)
        else:
            u = mappings.copy_to_tensor_model_parallel_region(F.linear(self._dropout(x), self.lora_A.weight))
        return F.linear(u, self.lora_B.weight) * self.lora_scaling

    def forward(self, x: torch.Tensor, weight=None) -> torch.Tensor:
        if not self.merged and weight is None:
            (x,) = autocast_copies(x)  # one copy for the base GEMM and the adapter, not one each
        with self._base():
            y = ColumnParallelLinear.forward(self, x, weight)
        if self.merged or weight is not None:
            return y
        return y + self.adapter_forward(x)


class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
    def _delta_weight(self, local: bool = False):
        B = self.lora_B.weight if local else mappings.copy_to_tensor_model_parallel_region(self.lora_B.weight)
        return B @ self.lora_A.weight  # [d_out, r] @ [r, d_in/tp]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        u = F.linear(self._dropout(x), self.lora_A.weight)  # partial sum over tp
        if self.sequence_parallel:
            u = mappings.reduce_scatter_to_sequence_parallel_region(u)
            B = mappings.copy_to_tensor_model_parallel_region(self.lora_B.weight)  # sees local tokens only
        else:
            u = mappings.reduce_from_tensor_model_parallel_region(u)
            B = self.lora_B.weight
        return F.linear(u, B) * self.lora_scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged:
            (x,) = autocast_copies(x)  # one copy for the base GEMM and the adapter, not one each
        with self._base():
            y = RowParallelLinear.forward(self, x)
        if self.merged:
            return y
        return y + self.adapter_forward(x).to(y.dtype)


def _adapt(layer: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Turn a built Column/RowParallelLinear into its LoRA variant in place (keeps parameters and names)."""
    tp = ps.get_tensor_model_parallel_world_size()
    w = layer._parameters["weight"]
    dev, dt = w.device, w.dtype
    if isinstance(layer, ColumnParallelLinear):
        layer.__class__ = LoRAColumnParallelLinear
        layer.lora_A = LoRAMatrix(cfg.rank, layer.input_size, dev, dt)
        layer.lora_B = LoRAMatrix(layer.output_size_per_partition, cfg.rank, dev, dt)
        specs = ((layer.lora_A.weight, False, 0, layer.input_size), (layer.lora_B.weight, tp > 1, 0, None))
    elif isinstance(layer, RowParallelLinear):
        layer.__class__ = LoRARowParallelLinear
        layer.lora_A = LoRAMatrix(cfg.rank, layer.input_size_per_partition, dev, dt)
        layer.lora_B = LoRAMatrix(layer.output_size, cfg.rank, dev, dt)
        specs = ((layer.lora_A.weight, tp > 1, 1, layer.input_size), (layer.lora_B.weight, False, 0, None))
    else:
        raise TypeError(f"LoRA adapts ColumnParallelLinear/RowParallelLinear, not {type(layer).__name__}")
    for p, parallel, dim, fan_in in specs:
        p.tensor_model_parallel, p.partition_dim = parallel, dim
        # A: the variance of PEFT's kaiming_uniform(a=sqrt(5)); B: zeros, so the adapted model starts unchanged.
        p.init_std = 1.0 / math.sqrt(3 * fan_in) if fan_in else 0.0
        p.lora = True
    layer.lora_rank, layer.lora_scaling, layer.lora_dropout_p = cfg.rank, cfg.scaling, cfg.dropout
    layer.merged, layer._calling_base, layer._warned = False, False, False
    return layer


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 1234, freeze_base: bool = True,
               require_match: bool = True) -> List[str]:
    """Adapt every target projection of ``model`` (skips MoE experts, which are not Linear layers); initialise the
    adapters layout-independently from (seed, name); freeze everything else. Returns the adapted module names.

    ``require_match=False``: a pipeline stage may hold no target (only the embedding or the output layer, or
    nothing); it gets no adapters and the caller checks that some stage matched (``strategies.apply_strategy``).
    The frozen base is marked ``frozen_by_lora`` so that DDP takes a stage left with nothing to train."""
    cfg.validate()
    names = []
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in cfg.target_modules and isinstance(mod, (ColumnParallelLinear,
                                                                             RowParallelLinear)):
            if isinstance(mod, _LoRAMixin):
                raise ConfigError(f"{name} already has a LoRA adapter; apply LoRA once")
            _adapt(mod, cfg)
            for sub in ("lora_A", "lora_B"):
                p = getattr(mod, sub).weight
                init_parameter(p, f"{name}.{sub}.weight", seed, p.init_std)
            names.append(name)
    if not names and require_match:
        raise ConfigError(no_match_message(cfg))
    if freeze_base:
        for n, p in model.named_parameters():
            p.requires_grad_(bool(getattr(p, "lora", False)))
        model.frozen_by_lora = True
    return names


def no_match_message(cfg: LoRAConfig) -> str:
    return (f"no module of the model matches --lora-target-modules {','.join(cfg.target_modules)} (MoE experts' "
            "projections are not adapted); name projections of the dense layers, e.g. q_proj,k_proj,v_proj,o_proj")


def lora_modules(model: nn.Module) -> Dict[str, _LoRAMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRAMixin)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (for export / inference); ``unmerge_lora`` undoes it."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's adapter shards, by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if getattr(p, "lora", False)}


def _full_tensor(p: torch.Tensor) -> torch.Tensor:
    """Gather a tp-sharded adapter into the full matrix (identity for replicated ones)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(parts, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=p.partition_dim)


def gather_lora_state_dict(model_chunks: Sequence[nn.Module]) -> Dict[str, torch.Tensor]:
    """Full (tp-gathered) adapter tensors of every pipeline stage; complete on global rank 0 (others get theirs).
    Collective over tp and pp: every rank must call it."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    local = {}
    for m in chunks:
        m = getattr(m, "module", m)
        for n, p in m.named_parameters():
            if getattr(p, "lora", False):
                local[n] = _full_tensor(p).cpu()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
        for part in parts:
            local.update(part)
    return local


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, full: Dict[str, torch.Tensor], strict: bool = True) -> int:
    """Copy full adapter tensors into this rank's shards; returns how many were loaded."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    n = 0
    for name, p in model.named_parameters():
        if not getattr(p, "lora", False):
            continue
        if name not in full:
            if strict:
                raise ConfigError(f"adapter file has no tensor {name}; it was saved for other target modules "
                                  f"or another model")
            continue
        t = full[name]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            t = t.chunk(tp, dim=p.partition_dim)[rank]
        if tuple(t.shape) != tuple(p.shape):
            raise ConfigError(f"adapter tensor {name} has shape {tuple(full[name].shape)}, the model expects "
                              f"{tuple(p.shape)} per rank; use the same --lora-rank and model")
        p.copy_(t.to(p.dtype))
        n += 1
    return n
