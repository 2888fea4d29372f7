"""What the optimizer needs to know, in Megatron's names (``OptimizerConfig``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megallama.errors import ConfigError


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"  # Megatron's --optimizer: adam (AdamW) or sgd (torch.optim.SGD; torch_optimizer.py)
    lr: float = 3e-4
    min_lr: float = 0.0  # used by the LR scheduler, kept here so one object describes the optimizer
    weight_decay: float = 0.01  # applied to >= 2-D parameters only (not norms or biases)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9  # Megatron's --sgd-momentum (its default); 0: plain SGD, no state
    clip_grad: float = 1.0  # global grad-norm clipping; 0 disables
    bf16: bool = False
    fp16: bool = False
    params_dtype: torch.dtype = torch.float32  # dtype of the model parameters (master copies are always fp32)
    loss_scale: Optional[float] = None  # fp16: a constant scale; None = dynamic scaling
    initial_loss_scale: float = 2.0 ** 16
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000  # steps without overflow before the dynamic scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    use_fused: Optional[bool] = None  # fused AdamW kernel; None = on CUDA when available, foreach otherwise
    log_num_zeros_in_grad: bool = False
    decoupled_lr: Optional[float] = None  # the embedding/output layer's peak LR: groups of their own (Megatron's)
    decoupled_min_lr: Optional[float] = None  # their floor (default min_lr); the scheduler owns both values

    def validate(self) -> "OptimizerConfig":
        if self.bf16 and self.fp16:
            raise ConfigError("both bf16 and fp16 are set; pick one of --bf16 / --fp16")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer '{self.optimizer}' is not adam or sgd; fix --optimizer")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ConfigError(f"sgd_momentum {self.sgd_momentum:g} must be in [0, 1); fix --sgd-momentum")
        if not self.lr >= 0:
            raise ConfigError(f"learning rate {self.lr} must be >= 0; pass a non-negative --lr")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"clip_grad {self.clip_grad} must be >= 0 (0 disables clipping); fix --clip-grad")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} {v} must be in [0, 1); fix --{name.replace('_', '-')}")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps {self.adam_eps} must be > 0; fix --adam-eps")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay {self.weight_decay} must be >= 0; fix --weight-decay")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"loss_scale {self.loss_scale} must be > 0 (or None for dynamic); fix --loss-scale")
        if self.initial_loss_scale <= 0:
            raise ConfigError(f"initial_loss_scale {self.initial_loss_scale} must be > 0; fix --initial-loss-scale")
        if self.params_dtype == torch.float16 and not self.fp16:
            raise ConfigError("--params-dtype fp16 needs --fp16: without its loss scaling the fp16 weight gradients "
                              "underflow; add --fp16, or keep the parameters in bf16 or fp32")
        if self.loss_scale is not None and self.loss_scale != 1 and not self.fp16:
            raise ConfigError(f"--loss-scale {self.loss_scale:g} applies to --fp16 only: bf16 and fp32 train "
                              "unscaled here (Megatron would scale them by it too); add --fp16 or drop --loss-scale")
        if self.fp16 and self.loss_scale is None:
            self._validate_dynamic_loss_scale()
        return self

    def _validate_dynamic_loss_scale(self) -> None:
        """Megatron's DynamicGradScaler asserts; a flag's name here instead (the Python API skips the CLI checks)."""
        if self.min_loss_scale <= 0 or self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ConfigError(f"fp16 loss scaling needs --min-loss-scale > 0, --loss-scale-window >= 1 and "
                              f"--hysteresis >= 1; got {self.min_loss_scale:g}, {self.loss_scale_window}, "
                              f"{self.hysteresis}")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale {self.min_loss_scale:g} is above --initial-loss-scale "
                              f"{self.initial_loss_scale:g}, so a back-off would raise the scale; pass a "
                              "--min-loss-scale no larger than --initial-loss-scale")
