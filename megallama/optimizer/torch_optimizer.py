"""The torch optimizer ``DistributedOptimizer`` runs on its fp32 pieces: Megatron's ``--optimizer adam`` or ``sgd``.

* ``adam``: ``torch.optim.AdamW`` (Megatron's default, decoupled weight decay); per-element states ``exp_avg`` and
  ``exp_avg_sq``, plus a step count.
* ``sgd``: ``torch.optim.SGD`` as Megatron builds it: momentum ``--sgd-momentum`` (default 0.9), dampening 0, no
  Nesterov (Megatron exposes neither), and ``--weight-decay`` passed to SGD itself, so it is L2 regularisation
  (``wd * param`` added to the clipped gradient before the momentum), not decoupled as in AdamW. One state,
  ``momentum_buffer``, which starts as the first step's gradient (torch's rule); none at momentum 0.

Both are fused on CUDA and foreach otherwise. They use the same groups (decay / no decay / decoupled LR) and the
same schedule sets their ``lr`` and ``weight_decay``, so clipping, loss scaling, ZeRO and checkpoints do not depend
on which one runs. Only the names of the per-element states change (``state_keys``).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

ADAM_STATES = ("exp_avg", "exp_avg_sq")
SGD_STATES = ("momentum_buffer",)


def state_keys(config) -> Tuple[str, ...]:
    """Names of the per-element fp32 states this configuration keeps, each as large as the parameters."""
    if config.optimizer == "sgd":
        return SGD_STATES if config.sgd_momentum else ()
    return ADAM_STATES


def build_torch_optimizer(groups: List[dict], config, fused: bool) -> torch.optim.Optimizer:
    kw = dict(fused=True) if fused else dict(foreach=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.sgd_momentum, dampening=0.0, nesterov=False,
                               **kw)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, **kw)


def set_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, states: dict, step: int, keys, fused: bool):
    """Put loaded per-element states in torch's state for ``param`` (fp32, on its device); Adam also needs its step
    count (a device tensor for the fused kernel, a CPU one otherwise, as torch keeps it)."""
    st = optimizer.state[param]
    if keys == ADAM_STATES:
        st["step"] = torch.tensor(float(step), dtype=torch.float32, device=param.device if fused else "cpu")
    for k in keys:
        st[k] = states[k].to(device=param.device, dtype=param.dtype).clone()


def describe(config) -> str:
    """One phrase for logs and errors: which optimizer keeps which states."""
    if config.optimizer == "sgd":
        return (f"--optimizer sgd (momentum {config.sgd_momentum:g}: "
                + ("momentum_buffer)" if config.sgd_momentum else "no state)"))
    return "--optimizer adam (exp_avg, exp_avg_sq)"
