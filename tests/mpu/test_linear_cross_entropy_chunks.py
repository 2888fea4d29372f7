"""Fused head internals on CPU: chunk sizing, bf16 compute with fp32 accumulation, and the two-phase math."""
import pytest
import torch
import torch.nn.functional as F

from dist_utils import rel_err
from megallama.mpu import linear_cross_entropy as lce


def test_chunk_rows_are_aligned_and_bounded():
    assert lce._chunk_rows(32768, 128256, 2) == 2048  # 512 MiB of bf16 logits, rounded down to 256 rows
    assert lce._chunk_rows(16384, 128256, 4) == 1024
    assert lce._chunk_rows(100, 300, 2) == 100  # all rows fit: one chunk, no rounding
    assert lce._chunk_rows(10**9, 2**30, 4) == 1


def test_bf16_autocast_path_matches_fp32_reference():
    torch.manual_seed(0)
    h = torch.randn(70, 32)
    w = torch.randn(120, 32) * 0.2
    t = torch.randint(0, 120, (70,))
    t[5] = -100
    wts = torch.rand(70)
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, per_tok = lce.linear_cross_entropy(a, b, t, wts, chunk_rows=16)
    total.backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = (h2.bfloat16() @ w2.bfloat16().t()).float()  # the same bf16 matmul, fp32 softmax
    ref_tok = F.cross_entropy(logits, t, reduction="none")
    (ref_tok * wts).sum().backward()
    assert rel_err(per_tok, ref_tok) < 1e-5 and rel_err(total, (ref_tok * wts).sum()) < 1e-5
    assert rel_err(a.grad, h2.grad) < 1e-2 and rel_err(b.grad, w2.grad) < 1e-2  # g is rounded to bf16 once



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_blocked_stats_equal_whole_row_stats(dtype):
    """The CUDA path's per-block max / sum-exp, merged, gives the whole-row statistics (CPU, eager)."""
    torch.manual_seed(0)
    rows, v = 37, 3 * 256 * 4
    logits = (torch.randn(rows, v, dtype=torch.float64) * 4).to(dtype)
    local = torch.randint(-1, v, (rows,))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    whole = lce._chunk_stats(logits, local, acc)
    for block in (256, 768, lce._stats_block(v)):
        blocked = lce._chunk_stats(logits, local, acc, block)
        assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[2], whole[2])
        assert rel_err(blocked[1], whole[1]) < (1e-12 if dtype == torch.float64 else 1e-6)


def test_stats_block_divides_the_row():
    assert lce._stats_block(128256) == 768 and lce._stats_block(32000) == 256 and lce._stats_block(8192) == 1024
    assert lce._stats_block(32016) == 696 and lce._stats_block(151936) == 0 and lce._stats_block(100) == 0
    for v in (128256, 64128, 32016, 50304):
        b = lce._stats_block(v)
        assert b == 0 or (v % b == 0 and 256 <= b <= 1024)


def test_frozen_weight_skips_grad_w_and_keeps_grad_h():
    """A frozen head (LoRA's) gets no weight gradient, and the hidden-state gradient is unchanged."""
    torch.manual_seed(2)
    n, hid, v = 40, 16, 96
    h, w = torch.randn(n, hid), torch.randn(v, hid) * 0.1
    t, wts = torch.randint(0, v, (n,)), torch.rand(n)
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    total, _ = lce.linear_cross_entropy(a, b, t, wts, chunk_rows=16)
    total.backward()
    a2 = h.clone().requires_grad_()
    calls = []
    orig = lce.gemm_accum_fp32_
    lce.gemm_accum_fp32_ = lambda *args: calls.append(1) or orig(*args)
    try:
        total2, _ = lce.linear_cross_entropy(a2, w, t, wts, chunk_rows=16)
        total2.backward()
    finally:
        lce.gemm_accum_fp32_ = orig
    assert calls == [] and torch.equal(total2, total) and torch.equal(a2.grad, a.grad)
