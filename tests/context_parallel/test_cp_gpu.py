"""CUDA block attention (torch's flash and memory-efficient kernels with logsumexp) against the exact math
backend, forward and backward with the merged-(out, lse) contract the ring relies on, GQA (flash: K/V as they are),
and the all-gather's bottom-right causal block (20 queries ending at the 40th key); 2 GPUs: ring and all-gather
attention over NCCL against full attention on one GPU. Skipped without CUDA (the CPU suite covers the logic)."""
import pytest
import torch

from dist_utils import rel_err, run_distributed
from megallama.model.block_attention import (block_attention_backward, block_attention_forward, merge_blocks,
                                             select_backend)


def _case(device, dtype, sq, sk, hq=8, hkv=2, d=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(2, hq, sq, d, generator=g).to(device, dtype)
    k, v = (torch.randn(2, hkv, sk, d, generator=g).to(device, dtype) for _ in range(2))
    dout = torch.randn(2, hq, sq, d, generator=g).to(device, dtype)
    return q, k, v, dout


def _docs(sq, sk, device):
    """Two documents; keys are the block before the queries (as in a ring step), so some rows see nothing."""
    qd = torch.tensor([0] * (sq // 3) + [1] * (sq - sq // 3), device=device)
    kd = torch.tensor([0] * (sk - 3) + [1] * 3, device=device)
    return (qd[:, None] == kd[None, :]).unsqueeze(0).expand(2, -1, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype,masked,tol", [
    ("flash", torch.bfloat16, False, 2e-2), ("efficient", torch.bfloat16, False, 2e-2),
    ("efficient", torch.bfloat16, True, 2e-2), ("efficient", torch.float32, False, 1e-4),
    ("efficient", torch.float32, True, 1e-4)])
@pytest.mark.parametrize("causal,sq,sk", [(True, 40, 40), (False, 40, 20), (False, 20, 40), (True, 20, 40)])
def test_cuda_block_attention_matches_math(backend, dtype, masked, tol, causal, sq, sk):
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    q, k, v, dout = _case(dev, dtype, sq, sk)
    allowed = _docs(sq, sk, dev) if masked else None
    out_ref, lse_ref = block_attention_forward(q, k, v, causal, allowed, backend="math")
    out, lse = block_attention_forward(q, k, v, causal, allowed, backend=backend)
    assert out.dtype == dtype and lse.shape == (2, 8, sq) and lse.dtype == torch.float32
    seen = torch.isfinite(lse_ref)
    assert torch.equal(seen, torch.isfinite(lse))
    assert rel_err(out, out_ref) < tol and rel_err(lse[seen], lse_ref[seen]) < 1e-3
    # backward with a merged (out, lse): merge with a second, unmasked block so every row has a finite lse
    o2, l2 = block_attention_forward(q, k, v, False, None, backend="math")
    mo, ml = merge_blocks(out_ref.float(), lse_ref, o2, l2)
    mo = mo.to(dtype)
    ref = block_attention_backward(dout, q, k, v, mo, ml, causal, allowed, backend="math")
    got = block_attention_backward(dout, q, k, v, mo, ml, causal, allowed, backend=backend)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.gpu
def test_auto_backend_on_cuda():
    q = torch.zeros(1, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert select_backend(q, None) == "flash"
    assert select_backend(q, torch.ones(1, 4, 4, dtype=torch.bool, device="cuda")) == "efficient"
    assert select_backend(q.float(), None) == "efficient"


def _ring_check(rank, world):
    from megallama.model.context_parallel import allgather_attention, ring_attention
    from megallama.mpu import parallel_state as ps
    from megallama.mpu.context_parallel import zigzag_indices
    torch.backends.cuda.matmul.allow_tf32 = False
    ps.initialize_model_parallel(1, 1, context_parallel_size=world)
    dev = torch.device("cuda", rank)
    errors = []
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        g = torch.Generator().manual_seed(3)
        b, s, hq, hkv, d = 2, 256, 8, 2, 64
        q, k, v = (torch.randn(b, s, h, d, generator=g).to(dev, dtype) for h in (hq, hkv, hkv))
        dout = torch.randn(b, s, hq, d, generator=g).to(dev, dtype)
        qr, kr, vr = (t.float().clone().requires_grad_() for t in (q, k, v))  # fp32: .float() alone aliases t
        ref = torch.nn.functional.scaled_dot_product_attention(
            qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=True,
            enable_gqa=True).transpose(1, 2)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.float())
        idx = zigzag_indices(s, world, rank, device=dev)
        for variant, fn in (("ring", ring_attention), ("allgather", allgather_attention)):
            ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
            out = fn(ql, kl, vl)
            out.backward(dout[:, idx])
            for name, a, r in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad),
                                  (ref,) + tuple(ref_grads)):
                e = rel_err(a, r[:, idx])
                if e > tol:
                    errors.append(f"rank {rank} {variant} {dtype} {name}: rel err {e:.2e}")
    ps.destroy_model_parallel()
    return errors


@pytest.mark.multigpu
def test_ring_attention_over_nccl_matches_full_attention():
    results = run_distributed(_ring_check, 2, backend="nccl")
    errors = [e for r in sorted(results) for e in results[r]]
    assert not errors, "\n".join(errors)
