"""Shared by the SGD tests: megallama's optimizer with ``--optimizer sgd`` over our DDP, and its oracle, plain
``torch.optim.SGD`` (momentum, L2 weight decay on >= 2-D parameters) + ``clip_grad_norm_`` on the single-process
model. The model, batches and loop are the ZeRO tests' (zero_harness)."""
from __future__ import annotations

import torch

from megallama.model import build_model
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from zero_harness import CFG, SEED, batch

SGD = dict(optimizer="sgd", lr=0.2, sgd_momentum=0.9, weight_decay=0.1, clip_grad=0.5)


def make_sgd(zero_stage: int, group=None, dtype=torch.float32, fp16=False, **overrides):
    model = build_model(CFG, seed=SEED, dtype=dtype)
    ddp = DistributedDataParallel(model, zero_stage=zero_stage, data_parallel_group=group, bucket_size=3000)
    cfg = OptimizerConfig(**dict(SGD, **overrides), params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=fp16)
    return ddp, get_megatron_optimizer(cfg, [ddp])


def torch_sgd(params, **overrides):
    """torch's SGD on ``params`` (name -> tensor) in megallama's two groups: decay for >= 2-D, none for the rest."""
    hp = dict(SGD, **overrides)
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": hp["weight_decay"]},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["sgd_momentum"], foreach=False)


def reference_sgd(steps: int, **overrides):
    """Single-process torch SGD + clip_grad_norm_ on the whole global batch: losses, norms, params."""
    model = build_model(CFG, seed=SEED)
    opt = torch_sgd(dict(model.named_parameters()), **overrides)
    clip = dict(SGD, **overrides)["clip_grad"]
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step)
        loss = model(x, labels=y).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}
