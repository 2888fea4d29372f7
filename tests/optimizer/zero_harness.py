"""Shared pieces of the ZeRO tests: a tiny Llama, a deterministic global batch per step, the single-process torch
AdamW oracle, and a data-parallel training loop over our DDP + optimizer (microbatches, no_sync, clipping)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megallama.config import ModelConfig
from megallama.model import build_model
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer

CFG = ModelConfig(name="zero-tiny", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, vocab_size=256, max_position_embeddings=64)
GLOBAL_BATCH, SEQ, SEED = 8, 16, 7
OPT = dict(lr=2e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.5)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def param_groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]


def reference_run(steps: int, cfg: ModelConfig = CFG):
    """Plain single-process torch AdamW + clip_grad_norm_ on the whole global batch: losses, norms, params."""
    torch.manual_seed(0)
    model = build_model(cfg, seed=SEED)
    opt = torch.optim.AdamW(param_groups(model), lr=OPT["lr"], betas=(OPT["adam_beta1"], OPT["adam_beta2"]),
                            eps=OPT["adam_eps"], foreach=False)
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step)
        loss = model(x, labels=y).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def make(zero_stage: int, group=None, cfg: ModelConfig = CFG, dtype=torch.float32, unused_param=False, **ddp_kw):
    model = build_model(cfg, seed=SEED, dtype=dtype)
    if unused_param:  # a trainable parameter no forward touches: its buckets are reduced with zeros for it
        model.unused = torch.nn.Parameter(torch.ones(40, dtype=dtype))
    ddp = DistributedDataParallel(model, zero_stage=zero_stage, data_parallel_group=group, **ddp_kw)
    opt = get_megatron_optimizer(OptimizerConfig(**OPT, params_dtype=dtype, bf16=dtype == torch.bfloat16), [ddp])
    return ddp, opt


def local_microbatches(step: int, dp: int, rank: int, num_microbatches: int, batch_fn=batch):
    """[(input_ids, labels)] of this dp rank's contiguous slice of ``step``'s global batch (``batch_fn(step)``),
    cut in microbatches."""
    x, y = batch_fn(step)
    per = x.shape[0] // dp
    mb = per // num_microbatches
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    return [(x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb]) for i in range(num_microbatches)]


def train(ddp, opt, start: int, steps: int, num_microbatches: int = 2, group=None, batch_fn=batch):
    """Steps ``start .. start+steps-1``; this dp rank takes its contiguous slice of the global batch."""
    dp = ddp.dp_size
    losses, norms = [], []
    for step in range(start, start + steps):
        opt.zero_grad()
        local = []
        for i, (x, y) in enumerate(local_microbatches(step, dp, ddp.dp_rank, num_microbatches, batch_fn)):
            with ddp.no_sync() if i < num_microbatches - 1 else contextlib.nullcontext():
                loss = ddp(x, labels=y).mean()
                (loss / num_microbatches).backward()
            local.append(loss.detach())
        ddp.finish_grad_sync()
        ok, norm, _ = opt.step()
        assert ok
        mean = torch.stack(local).mean().reshape(1)
        if ddp.dp_group is not None:
            dist.all_reduce(mean, group=ddp.dp_group)
            mean /= dp
        losses.append(float(mean))
        norms.append(norm)
    return losses, norms
