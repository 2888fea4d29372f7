"""Gradient-accumulation fusion (mpu/grad_accum_fusion.py): the weight-gradient GEMMs sum into the fp32
``main_grad`` themselves. On CPU (allowed here; the CUDA kernel is tested in tests/ops/test_gemm_accum.py) a bf16
model's main grads must match the unfused path to bf16 rounding and be at least as close to the fp32 model's, over
microbatches, ZeRO 0/1 and dp 2 with overlapped bucket reduction (whose bookkeeping relies on the placeholder)."""
import contextlib

import pytest
import torch
import torch.distributed as dist

import megallama.mpu.layers as layers
from dist_utils import rel_err, run_distributed
from megallama.mpu import grad_accum_fusion
from zero_harness import CFG, SEED, local_microbatches, make


@contextlib.contextmanager
def fusion(enabled: bool):
    calls = []
    real = layers.accumulate_weight_grad

    def counting(*a):
        calls.append(1)
        return real(*a)
    layers.accumulate_weight_grad = counting
    grad_accum_fusion.set_gradient_accumulation_fusion(enabled, allow_cpu=True)
    try:
        yield calls
    finally:
        layers.accumulate_weight_grad = real
        grad_accum_fusion.set_gradient_accumulation_fusion(True, allow_cpu=False)


def _main_grads(dtype, enabled, zero_stage=0, world=1, rank=0, overlap=False, steps=1):
    torch.manual_seed(0)
    group = dist.group.WORLD if world > 1 else None
    ddp, opt = make(zero_stage, group=group, dtype=dtype, overlap_grad_reduce=overlap, bucket_size=4000)
    assert ddp.dp_size == world
    with fusion(enabled) as calls:
        for step in range(steps):
            opt.zero_grad()
            mbs = local_microbatches(step, world, rank, 2)
            for i, (x, y) in enumerate(mbs):
                with ddp.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext():
                    (ddp(x, labels=y).float().mean() / len(mbs)).backward()
            ddp.finish_grad_sync()
            grads = {n: (p.main_grad if zero_stage == 0 else ddp.grad_buffer).detach().float().clone()
                     for n, p in ddp.module.named_parameters()}
            if step < steps - 1:
                opt.step()
        params = {n: p.detach().float().clone() for n, p in ddp.module.named_parameters()}
    assert all(not getattr(p, "grad_added_to_main_grad", False) for p in ddp.module.parameters())
    return grads, params, len(calls)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_fused_main_grads_match_unfused_and_fp32(zero_stage):
    fused, _, n_fused = _main_grads(torch.bfloat16, True, zero_stage)
    plain, _, n_plain = _main_grads(torch.bfloat16, False, zero_stage)
    ref, _, _ = _main_grads(torch.float32, True, zero_stage)
    # per microbatch: q, k, v, o, gate, up, down of every layer, and the (untied, unfused here) output layer
    per_mb = CFG.num_layers * 7 + 1
    assert n_plain == 0 and n_fused == 2 * per_mb
    for n in ref:
        assert rel_err(fused[n], plain[n]) < 2e-2, n
        assert rel_err(fused[n], ref[n]) <= rel_err(plain[n], ref[n]) * 1.05 + 1e-6, n


def test_tied_embedding_keeps_its_lookup_gradient():
    """A tied output layer runs through the column GEMM with the embedding table as its weight; the table's .grad
    then also holds the lookup's gradient, so the table must not be fused (its placeholder would hide that part)."""
    import dataclasses
    from megallama.model import build_model
    from megallama.optimizer import DistributedDataParallel
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    out = {}
    for enabled in (True, False):
        ddp = DistributedDataParallel(build_model(cfg, dtype=torch.bfloat16, seed=SEED), zero_stage=0)
        assert not hasattr(ddp.module, "lm_head")
        with fusion(enabled) as calls:
            for x, y in local_microbatches(0, 1, 0, 2):
                (ddp(x, labels=y).float().mean() / 2).backward()  # labels without a mask: the column-GEMM head
        out[enabled] = ({n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}, len(calls))
    (fused, n_fused), (plain, _) = out[True], out[False]
    assert n_fused == 2 * CFG.num_layers * 7
    for n in plain:
        assert rel_err(fused[n], plain[n]) < 2e-2, n


def _dp_job(rank, world):
    """Results as floats (tensors would travel through file descriptors the exiting rank closes)."""
    runs = [_main_grads(dtype, enabled, zero_stage=1, world=world, rank=rank, overlap=True, steps=3)
            for dtype, enabled in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False))]
    (fused, params, n_fused), (plain, _, n_plain), (ref, _, _) = runs
    flat = {k: torch.cat([v.flatten() for v in g.values()]) for k, g in (("f", fused), ("p", plain), ("r", ref))}
    return (n_fused, n_plain, rel_err(flat["f"], flat["p"]), rel_err(flat["f"], flat["r"]),
            rel_err(flat["p"], flat["r"]), torch.cat([p.flatten() for p in params.values()]).double().sum().item())


def test_fused_dp2_overlapped_buckets_train_like_unfused():
    """Third step of dp 2, ZeRO-1 with overlapped bucket reduce-scatter (after two AdamW steps): the fused run's
    gradients match the unfused ones to bf16 rounding and are no further from the fp32 run's; both ranks hold the
    same parameters."""
    res = run_distributed(_dp_job, 2)
    for rank, (n_fused, n_plain, err, err_fused, err_plain, _) in res.items():
        assert n_fused > 0 and n_plain == 0 and err < 2e-2, (rank, n_fused, n_plain, err)
        assert err_fused <= 1.1 * err_plain, (rank, err_fused, err_plain)
    assert res[0][-1] == res[1][-1]


def test_compiled_backward_does_not_fuse(monkeypatch):
    """Inside torch.compile a traced backward would keep the GEMM but lose the mark: no fusion there."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.bfloat16))
    p.main_grad = torch.zeros(3, 4)
    g, x = torch.ones(5, 3, dtype=torch.bfloat16), torch.ones(5, 4, dtype=torch.bfloat16)
    with fusion(True):
        assert grad_accum_fusion.main_grad_target(p, g, x) is None
        monkeypatch.undo()
        assert grad_accum_fusion.main_grad_target(p, g, x) is p.main_grad


@pytest.mark.gpu
def test_cuda_fused_main_grads_match_unfused_and_fp32():
    """On CUDA the fusion is on by default (the cuBLAS kernel, when the extension was built with it)."""
    from megallama.model import build_model
    from megallama.ops.gemm import gemm_accum_path
    from megallama.optimizer import DistributedDataParallel
    probe = torch.zeros(2, 2, device="cuda")
    if gemm_accum_path(probe, probe.bfloat16(), probe.bfloat16()) != "fused":
        pytest.skip("the csrc gemm_accum CUDA kernel is not built")
    out = {}
    for dtype, enabled in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)):
        ddp = DistributedDataParallel(build_model(CFG, device="cuda", dtype=dtype, seed=SEED), zero_stage=0)
        with fusion(enabled) as calls:
            grad_accum_fusion.set_gradient_accumulation_fusion(enabled)  # CUDA: no allow_cpu needed
            for x, y in local_microbatches(0, 1, 0, 2):
                (ddp(x.cuda(), labels=y.cuda()).float().mean() / 2).backward()
        out[(dtype, enabled)] = (torch.cat([p.main_grad.flatten() for p in ddp.module.parameters()]), len(calls))
    (fused, n_fused), (plain, n_plain), (ref, _) = out.values()
    assert n_fused == 2 * (CFG.num_layers * 7 + 1) and n_plain == 0
    assert rel_err(fused, plain) < 2e-2 and rel_err(fused, ref) <= 1.05 * rel_err(plain, ref)
