"""The compression kernels (C++ CPU) equal their PyTorch references: 1-bit packing bit for bit (scales and residuals
to fp32 rounding), unpacking and top-k exactly (ties included); round trips are exact where they should be, and
error feedback keeps the sum of what was sent on the sum of the inputs with a bounded residual."""
import pytest
import torch

from megallama.ops import _extension
from megallama.ops import compression as C


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """These tests must exercise the kernels: a missing build (or a stale one without these ops) is a failure."""
    _extension.set_fused_kernels(True)
    assert _extension.load(), "megallama kernels failed to load (see the RuntimeWarning for the build error)"
    assert _extension.has_op("onebit_pack") and _extension.has_op("topk_pack"), "the kernel library lacks the compression ops"
    yield


SIZES = [1, 7, 8, 9, 2047, 2048, 2049, 10_001, 100_003]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("chunk", [8, 64, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_onebit_pack_matches_reference(n, chunk, dtype):
    g = torch.Generator().manual_seed(n * 7 + chunk)
    x = torch.randn(n, generator=g).to(dtype)
    e = 0.1 * torch.randn(n, generator=g)
    e_ref, e_out = e.clone(), e.clone()
    packed, scales = C.onebit_pack(x, e_out, chunk)
    packed_ref, scales_ref = C.onebit_pack_reference(x, e_ref, chunk)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert scales.dtype == torch.float32 and scales.shape == (-(-n // chunk),)
    assert torch.equal(packed, packed_ref)
    torch.testing.assert_close(scales, scales_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(e_out, e_ref, rtol=1e-6, atol=1e-6)
    # round trip: what was sent plus what was kept is the input plus the old error (to one rounding)
    sent = C.onebit_unpack(packed, scales, n, chunk)
    torch.testing.assert_close(sent + e_out, x.float() + e, rtol=1e-6, atol=1e-6)
    # the message is signs times the chunk's mean |c|
    c = x.float() + e
    assert torch.equal(sent > 0, c >= 0)
    assert torch.equal(sent.abs(), scales.repeat_interleave(chunk)[:n])


@pytest.mark.parametrize("n", [5, 2049, 100_003])
@pytest.mark.parametrize("rows", [1, 3])
def test_onebit_unpack_sums_rows_exactly(n, rows):
    chunk = 64
    g = torch.Generator().manual_seed(n + rows)
    packed = torch.randint(0, 256, (rows, (n + 7) // 8), generator=g, dtype=torch.uint8)
    scales = torch.rand(rows, -(-n // chunk), generator=g)
    for alpha in (1.0, 1.0 / rows, 0.3):
        out = C.onebit_unpack(packed, scales, n, chunk, alpha)
        assert torch.equal(out, C.onebit_unpack_reference(packed, scales, n, chunk, alpha))
    total = sum(C.onebit_unpack(packed[r], scales[r], n, chunk) for r in range(rows))
    assert torch.equal(C.onebit_unpack(packed, scales, n, chunk), total)


def _with_ties(n, g):
    x = torch.randn(n, generator=g)
    e = 0.1 * torch.randn(n, generator=g)
    if n > 20:  # many equal |c| (both signs) straddling the threshold
        x[::5], e[::5] = 0.75, 0.0
        x[1::10], e[1::10] = -0.75, 0.0
    return x, e


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_pack_matches_reference(n, frac, dtype):
    g = torch.Generator().manual_seed(n + int(frac * 100))
    x, e = _with_ties(n, g)
    x = x.to(dtype)
    k = int(frac * n)
    e_ref, e_out = e.clone(), e.clone()
    values, indices = C.topk_pack(x, e_out, k)
    values_ref, indices_ref = C.topk_pack_reference(x, e_ref, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int32 and values.shape == (k,)
    assert torch.equal(indices, indices_ref) and torch.equal(values, values_ref) and torch.equal(e_out, e_ref)
    assert bool((indices[1:] > indices[:-1]).all())  # ascending
    # exact round trip: sent + kept == x + old error, element for element
    c = x.float() + e
    assert torch.equal(C.topk_unpack(values, indices, n) + e_out, c)
    if 0 < k < n:  # nothing left behind is larger than what was sent
        assert float(e_out.abs().max()) <= float(values.abs().min())


@pytest.mark.parametrize("rows", [1, 4])
def test_topk_unpack_sums_rows_exactly(rows):
    n, k = 5000, 300
    g = torch.Generator().manual_seed(rows)
    indices = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(rows)]).int()
    values = torch.randn(rows, k, generator=g)
    for alpha in (1.0, 1.0 / rows):
        assert torch.equal(C.topk_unpack(values, indices, n, alpha),
                           C.topk_unpack_reference(values, indices, n, alpha))


@pytest.mark.parametrize("method", ["onebit", "topk"])
def test_error_feedback_tracks_the_running_sum(method):
    """Sum of decompressed messages == sum of inputs - final residual (to rounding), and the residual stays
    bounded: after 300 steps the relative error of the running sum is small and does not grow with time."""
    n, steps = 4096, 300
    g = torch.Generator().manual_seed(3)
    drift = torch.randn(n, generator=g)  # a persistent signal under noise, like a gradient
    err = torch.zeros(n)
    sent_sum, true_sum = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    resid = []
    for t in range(steps):
        x = drift + 3 * torch.randn(n, generator=g)
        if method == "onebit":
            p, s = C.onebit_pack(x, err, 256)
            sent = C.onebit_unpack(p, s, n, 256)
        else:
            v, i = C.topk_pack(x, err, n // 50)
            sent = C.topk_unpack(v, i, n)
        sent_sum += sent.double()
        true_sum += x.double()
        resid.append(float(err.norm()))
        if t in (99, 299):
            torch.testing.assert_close(sent_sum + err.double(), true_sum, rtol=0, atol=1e-3)
    assert float((sent_sum - true_sum).norm() / true_sum.norm()) < 0.1
    assert max(resid[200:]) < 1.5 * max(resid[50:150])  # bounded, not growing


def test_reference_fallback_gives_the_same_answer():
    x, e = torch.randn(3000), torch.randn(3000)
    fused = C.onebit_pack(x, e.clone(), 64), C.topk_pack(x, e.clone(), 100)
    _extension.set_fused_kernels(False)
    try:
        ref = C.onebit_pack(x, e.clone(), 64), C.topk_pack(x, e.clone(), 100)
    finally:
        _extension.set_fused_kernels(True)
    assert torch.equal(fused[0][0], ref[0][0]) and torch.equal(fused[1][1], ref[1][1])


def test_bad_inputs_raise():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="chunk_size 12"):
        C.onebit_pack(x, torch.zeros(100), 12)
    with pytest.raises(ValueError, match="float32"):
        C.onebit_pack(x, torch.zeros(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="100 elements"):
        C.topk_pack(x, torch.zeros(99), 5)
    with pytest.raises(ValueError, match="k 101"):
        C.topk_pack(x, torch.zeros(100), 101)
    with pytest.raises(ValueError, match="do not describe"):
        C.onebit_unpack(torch.zeros(3, dtype=torch.uint8), torch.zeros(1), 100, 64)
    with pytest.raises(RuntimeError, match="outside"):  # the kernel checks indices on the CPU
        torch.ops.megallama.topk_unpack(torch.ones(1), torch.tensor([7], dtype=torch.int32), 5, 1.0)
