"""Shared pieces of the context-parallel tests: a tiny GQA Llama, a batch with a loss mask (and packed documents),
the single-process oracle, and the cp run of one layout (loss + full gradients) on a gloo rank."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megallama.config import ModelConfig
from megallama.model import build_model
from megallama.model.context_parallel import set_context_parallel_comm_type
from megallama.mpu import allreduce_sequence_parallel_gradients
from megallama.mpu import parallel_state as ps
from megallama.mpu.context_parallel import cp_mean_loss, get_batch_on_this_cp_rank, zigzag_indices

# 4 heads, 2 kv heads (GQA), head_dim 16; seq 32 = 8 zig-zag chunks of 4 at cp=4.
CFG = ModelConfig(name="cp-tiny", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=256, max_position_embeddings=64, rope_theta=10000.0)
BATCH, SEQ, SEED, TOL = 2, 32, 11, 1e-5
OPT = dict(lr=2e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-6, clip_grad=1.0)


def make_batch(step: int = 0, documents: bool = False, batch: int = BATCH) -> dict:
    """input_ids/labels/loss_mask [b, SEQ]; with ``documents`` also packed-sequence document_ids and
    position_ids restarting at each document (as the SFT packer gives them)."""
    g = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, CFG.vocab_size, (batch, SEQ + 1), generator=g)
    out = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
           "loss_mask": (torch.rand(batch, SEQ, generator=g) > 0.3).float()}
    if documents:
        docs = torch.zeros(batch, SEQ, dtype=torch.long)
        pos = torch.zeros(batch, SEQ, dtype=torch.long)
        for i in range(batch):
            cuts = sorted(torch.randperm(SEQ - 1, generator=g)[:3].add(1).tolist())  # 4 documents
            d = torch.zeros(SEQ, dtype=torch.long)
            for c in cuts:
                d[c:] += 1
            docs[i] = d
            starts = torch.tensor([0] + cuts)
            pos[i] = torch.arange(SEQ) - starts[d]
        out["document_ids"], out["position_ids"] = docs, pos
    return out


def _model_kwargs(batch: dict) -> dict:
    kw = {"labels": batch["labels"], "loss_mask": batch["loss_mask"]}
    for k in ("position_ids", "document_ids"):
        if k in batch:
            kw[k] = batch[k]
    return kw


def reference(documents: bool = False, cfg: ModelConfig = CFG) -> dict:
    """One process, whole sequence: masked-mean loss and every gradient (numpy)."""
    batch = make_batch(0, documents)
    model = build_model(cfg, seed=SEED)
    loss = model(batch["input_ids"], **_model_kwargs(batch)) / batch["loss_mask"].sum()
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.numpy() for n, p in model.named_parameters()}}


def gather_tp(t: torch.Tensor, param) -> torch.Tensor:
    """Full (tp-gathered) value of ``t`` laid out like ``param``."""
    n = ps.get_tensor_model_parallel_world_size()
    if n == 1 or not getattr(param, "tensor_model_parallel", False):
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def cp_run(tp: int, cp: int, comm_type: str = "p2p", sequence_parallel: bool = False, documents: bool = False,
           recompute: bool = False, cfg: ModelConfig = CFG, hierarchical=None) -> dict:
    """This rank's share of the batch through the cp model; grads averaged over cp as the DDP does (dp x cp),
    the loss averaged over cp for logging."""
    ps.initialize_model_parallel(tp, 1, context_parallel_size=cp)
    set_context_parallel_comm_type(comm_type, hierarchical)
    try:
        batch = get_batch_on_this_cp_rank(make_batch(0, documents))
        model = build_model(cfg, seed=SEED, sequence_parallel=sequence_parallel)
        if recompute:
            model.model.recompute_granularity = "full"
        loss = cp_mean_loss(model(batch["input_ids"], **_model_kwargs(batch)), batch["loss_mask"])
        loss.backward()
        allreduce_sequence_parallel_gradients(model)
        group = ps.get_data_parallel_group(with_context_parallel=True)
        loss = loss.detach().reshape(1)
        dist.all_reduce(loss, group=group)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
            p.grad /= cp
        return {"loss": loss.item() / cp,
                "grads": {n: gather_tp(p.grad, p).numpy() for n, p in model.named_parameters()}}
    finally:
        set_context_parallel_comm_type("p2p")
        ps.destroy_model_parallel()


# ---------------------------------------------------------------- training with our DDP / ZeRO over dp x cp
def reference_training(steps: int) -> list:
    """torch AdamW + clipping on the whole global batch (BATCH x dp samples): losses per step and final weights."""
    model = build_model(CFG, seed=SEED)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=OPT["lr"],
                            betas=(OPT["adam_beta1"], OPT["adam_beta2"]), eps=OPT["adam_eps"], foreach=False)
    losses = []
    for step in range(steps):
        b = make_batch(step, batch=4)
        b["loss_mask"] = torch.ones_like(b["loss_mask"])  # equal token counts per dp replica: mean of means = mean
        loss = model(b["input_ids"], **_model_kwargs(b)) / b["loss_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def zero_training(zero_stage: int, cp: int, steps: int, comm_type: str = "p2p", hierarchical=None):
    """dp x cp ranks with our DDP (default group: dp x cp) and distributed optimizer."""
    from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
    set_context_parallel_comm_type(comm_type, hierarchical)
    try:
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        ddp = DistributedDataParallel(build_model(CFG, seed=SEED), zero_stage=zero_stage)
        opt = get_megatron_optimizer(OptimizerConfig(**OPT, params_dtype=torch.float32), [ddp])
        losses = []
        for step in range(steps):
            opt.zero_grad()
            b = make_batch(step, batch=4)
            b["loss_mask"] = torch.ones_like(b["loss_mask"])
            per = 4 // dp
            b = {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in b.items()}
            b = get_batch_on_this_cp_rank(b)
            loss = cp_mean_loss(ddp(b["input_ids"], **_model_kwargs(b)), b["loss_mask"])
            loss.backward()
            ddp.finish_grad_sync()
            ok, _, _ = opt.step()
            assert ok
            val = loss.detach().reshape(1)
            dist.all_reduce(val, group=ps.get_data_parallel_group(with_context_parallel=True))
            losses.append(val.item() / (dp * cp))
        return losses, {k: v.detach().numpy() for k, v in ddp.state_dict().items()}
    finally:
        set_context_parallel_comm_type("p2p")
        ps.destroy_model_parallel()


def attention_errors(rank: int, world: int, variants: dict):
    """Each of ``variants`` ({name: fn(q, k, v, document_ids=)}) on this rank's zig-zag chunks of a GQA batch,
    with and without packed documents, against full causal attention in fp64: ({(name, documents): the largest
    relative error of the output and the q/k/v gradients}, (q, k, v, this rank's indices))."""
    from dist_utils import rel_err
    b, s, hq, hkv, d = 2, 16, 4, 2, 8
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for h in (hq, hkv, hkv))
    dout = torch.randn(b, s, hq, d, generator=g)
    docs = torch.tensor([[0] * 3 + [1] * 9 + [2] * 4, [0] * 11 + [1] * 5])
    idx = zigzag_indices(s, world, rank)
    out = {}
    for documents in (False, True):
        qr, kr, vr = (t.clone().double().requires_grad_() for t in (q, k, v))
        same = docs[:, :, None] == docs[:, None, :]
        mask = torch.ones(s, s, dtype=torch.bool).tril() & same if documents else \
            torch.ones(s, s, dtype=torch.bool).tril()[None]
        ref = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.repeat_interleave(2, 2).transpose(1, 2),
                                             vr.repeat_interleave(2, 2).transpose(1, 2),
                                             attn_mask=mask[:, None]).transpose(1, 2)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
        for name, fn in variants.items():
            ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
            o = fn(ql, kl, vl, document_ids=docs[:, idx] if documents else None)
            o.backward(dout[:, idx])
            errs = [rel_err(o, ref[:, idx])] + [rel_err(t.grad, rg[:, idx]) for t, rg in zip((ql, kl, vl), ref_grads)]
            out[(name, documents)] = max(errs)
    return out, (q, k, v, idx)


def assert_same_as_one_process(got: dict, ref: dict, rank: int) -> None:
    """A cp run's {"loss", "grads"} against the one-process oracle's, to TOL (relative; relative norm)."""
    from dist_utils import rel_err
    assert abs(got["loss"] - ref["loss"]) / abs(ref["loss"]) < TOL, (rank, got["loss"], ref["loss"])
    assert set(got["grads"]) == set(ref["grads"])
    for pname, g in ref["grads"].items():
        e = rel_err(torch.from_numpy(got["grads"][pname]), torch.from_numpy(g))
        assert e < TOL, (rank, pname, e)


def assert_training_same_as_one_process(got, ref, rank: int) -> None:
    """(losses, params) of a cp training run against ``reference_training``'s, to TOL."""
    from dist_utils import rel_err
    (losses, params), (ref_losses, ref_params) = got, ref
    for step, (l, rl) in enumerate(zip(losses, ref_losses)):
        assert abs(l - rl) / abs(rl) < TOL, (rank, step, l, rl)
    for pname, p in ref_params.items():
        e = rel_err(torch.from_numpy(params[pname]), torch.from_numpy(p))
        assert e < TOL, (rank, pname, e)
