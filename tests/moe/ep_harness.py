"""Shared pieces of the expert-parallel equivalence tests: a tiny MoE Llama (fp32, no dropout), a global batch per
step with a loss mask, the single-process torch AdamW oracle, and a run of one layout (tp 1; dp x cp x ep) with our
DDP/ZeRO and distributed optimizer, returning its losses, the full (gathered) gradients of the first step and the
full parameters at the end.

The MoE load-balancing loss is one per micro-batch (its statistics cover the micro-batch's tokens, summed over the
cp ranks that hold pieces of it), so the oracle runs the dp ranks' micro-batches one by one, in global order, with
the aux gradient scale 1 / (dp x micro-batches); the ranks use 1 / micro-batches, the dp x cp mean does the rest."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from megallama.config import ModelConfig
from megallama.model import build_model
from megallama.model.moe import set_aux_loss_scale
from megallama.mpu import parallel_state as ps
from megallama.mpu.context_parallel import cp_mean_loss, get_batch_on_this_cp_rank
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megallama.strategies import TrainingStrategy, apply_strategy

CFG = ModelConfig(name="ep-tiny", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, vocab_size=128, max_position_embeddings=64)
MOE = {"num_experts": 4, "experts_per_token": 2, "moe_aux_loss_coeff": 0.05, "moe_z_loss_coeff": 1e-2}
GLOBAL_BATCH, SEQ, SEED, TOL = 4, 16, 5, 1e-5
OPT = dict(lr=2e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.5)


def moe_model():
    m = build_model(CFG, seed=SEED)
    apply_strategy([m], TrainingStrategy("moe", dict(MOE)), seed=SEED)
    return m


def make_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(300 + step)
    ids = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "loss_mask": (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.25).float()}


def microbatches(step: int, dp: int, dp_rank: int, m: int) -> list:
    """Data-parallel rank ``dp_rank``'s ``m`` micro-batches of the step: its contiguous block, in order."""
    b = make_batch(step)
    per = GLOBAL_BATCH // dp
    mb = per // m
    return [{k: v[dp_rank * per + i * mb:dp_rank * per + (i + 1) * mb] for k, v in b.items()} for i in range(m)]


def _forward(model, b) -> torch.Tensor:
    """This rank's share of a micro-batch's masked-mean loss (the whole loss at cp = 1)."""
    b = get_batch_on_this_cp_rank(b)
    return cp_mean_loss(model(b["input_ids"], labels=b["labels"], loss_mask=b["loss_mask"]), b["loss_mask"])


def param_groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]


def reference_worker(rank, world, dp: int, m: int, steps: int):
    """One process, the dp ranks' micro-batches one by one: losses, first-step grads, final params (numpy)."""
    model = moe_model()
    opt = torch.optim.AdamW(param_groups(model), lr=OPT["lr"], betas=(OPT["adam_beta1"], OPT["adam_beta2"]),
                            eps=OPT["adam_eps"], foreach=False)
    losses, grads = [], None
    for step in range(steps):
        set_aux_loss_scale(1.0 / (dp * m))
        total = 0.0
        for r in range(dp):
            for b in microbatches(step, dp, r, m):
                loss = _forward(model, b)
                (loss / (dp * m)).backward()
                total += loss.item() / (dp * m)
        if grads is None:
            grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, grads, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _cat_over_ep(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ps.get_expert_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_expert_model_parallel_group())
    return torch.cat(parts, dim=0)


def full_grads(ddp) -> dict:
    """Every parameter's averaged gradient, assembled from all ranks' optimizer pieces (call after
    finish_grad_sync): expert pieces by ep rank, then the ep ranks' experts concatenated."""
    ep_rank = ps.get_expert_model_parallel_rank()
    mine = [(pc.name, ep_rank if pc.comm.expert else None, pc.param_start, pc.param_end,
             pc.grad_view.detach().numpy().copy()) for pc in ddp.optimizer_pieces()]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    shapes = {n: tuple(ddp.shapes[p]) for n, p in ddp.module.named_parameters()}
    flat = {}
    for rank_pieces in parts:
        for name, ep, a, z, g in rank_pieces:
            buf = flat.setdefault((name, ep), np.full(int(np.prod(shapes[name])), np.nan, dtype=np.float32))
            buf[a:z] = g
    out = {}
    for name, shape in shapes.items():
        eps = sorted(ep for n, ep in flat if n == name and ep is not None)
        if eps:  # expert params: rank ep's local experts are experts [ep * E_local, (ep + 1) * E_local)
            out[name] = np.concatenate([flat[(name, ep)].reshape(shape) for ep in eps], axis=0)
        else:
            out[name] = flat[(name, None)].reshape(shape)
        assert not np.isnan(out[name]).any(), f"no rank holds part of the gradient of {name}"
    return out


def full_params(ddp) -> dict:
    """Every full parameter (experts concatenated over ep); ZeRO-3 gathers its shards (collective)."""
    sd = ddp.state_dict()
    names = dict(ddp.module.named_parameters())
    out = {}
    for n, t in sd.items():
        p = names.get(n)
        if p is None:
            continue
        t = t.detach()
        if getattr(p, "expert_parallel", False) and ps.get_expert_model_parallel_world_size() > 1:
            t = _cat_over_ep(t)
        out[n] = t.numpy().copy()
    return out


def layout_run(cp: int, ep: int, stage: int, m: int, steps: int):
    """This rank's run of dp x cp x ep (dp = world / cp): losses (the dp x cp mean), first-step full grads and
    final full params."""
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp, expert_model_parallel_size=ep)
    try:
        model = moe_model()
        ddp = DistributedDataParallel(model, zero_stage=stage, bucket_size=2000, overlap_grad_reduce=True)
        assert ddp.expert_comm is not None
        opt = get_megatron_optimizer(OptimizerConfig(**OPT, params_dtype=torch.float32), [ddp])
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        losses, grads = [], None
        for step in range(steps):
            opt.zero_grad()
            set_aux_loss_scale(1.0 / m)  # as the training loop: the aux losses' share of each micro-batch
            total = torch.zeros(1)
            mbs = microbatches(step, dp, dp_rank, m)
            for i, b in enumerate(mbs):
                with ddp.no_sync() if i < m - 1 else contextlib.nullcontext():
                    loss = _forward(ddp, b)
                    (loss / m).backward()
                total += loss.detach() / m
            ddp.finish_grad_sync()
            if grads is None:
                grads = full_grads(ddp)
            ok, _, _ = opt.step()
            assert ok
            dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
            losses.append(total.item() / (dp * cp))
        ddp.finish_param_sync()
        return losses, grads, full_params(ddp)
    finally:
        ps.destroy_model_parallel()


def assert_same(got, ref, what: str) -> None:
    from dist_utils import rel_err
    (losses, grads, params), (ref_losses, ref_grads, ref_params) = got, ref
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= TOL * abs(b), f"{what}: loss at step {i + 1}: {a} vs {b}"
    for kind, mine, theirs in (("grad", grads, ref_grads), ("param", params, ref_params)):
        assert set(mine) == set(theirs), f"{what}: {kind} names differ"
        for n, v in theirs.items():
            e = rel_err(torch.from_numpy(mine[n]), torch.from_numpy(v))
            assert e <= TOL, f"{what}: {kind} {n}: relative error {e:.2e}"
