"""The CUDA compression kernels equal the CPU kernels: 1-bit signs and unpacking bit for bit (scales and residuals
to fp32 rounding), top-k selection, values, residuals and unpacking exactly (the same radix select and tie rule).
Outputs land in NaN-poisoned memory, so an element a kernel fails to write cannot pass."""
import pytest
import torch

from megallama.ops import _extension
from megallama.ops import compression as C

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_kernels():
    _extension.set_fused_kernels(True)
    assert _extension.load(), "megallama kernels failed to load"
    assert _extension._state["cuda"], "the kernel library was built without its CUDA kernels"
    assert _extension.has_op("onebit_pack"), "the kernel library lacks the compression ops"


def _poison():
    free = torch.cuda.mem_get_info()[0]
    blocks = [torch.full((1 << 26,), float("nan"), device=DEV) for _ in range(min(8, free // (1 << 29)))]
    del blocks


SIZES = [1, 9, 2049, 100_003, 5_000_011]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("chunk", [8, 2048, 4096, 65536])  # one and two octets a thread, two passes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_onebit_cuda_equals_cpu(n, chunk, dtype):
    g = torch.Generator().manual_seed(n + chunk)
    x = torch.randn(n, generator=g).to(dtype)
    e = 0.1 * torch.randn(n, generator=g)
    e_cpu, e_gpu = e.clone(), e.to(DEV)
    p_cpu, s_cpu = C.onebit_pack(x, e_cpu, chunk)
    _poison()
    p_gpu, s_gpu = C.onebit_pack(x.to(DEV), e_gpu, chunk)
    assert torch.equal(p_gpu.cpu(), p_cpu)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=2e-6, atol=0)
    torch.testing.assert_close(e_gpu.cpu(), e_cpu, rtol=1e-5, atol=1e-6)
    rows = torch.stack([p_cpu, p_cpu.roll(3)]), torch.stack([s_cpu, 0.5 * s_cpu])
    for alpha in (1.0, 0.5):
        _poison()
        out = C.onebit_unpack(rows[0].to(DEV), rows[1].to(DEV), n, chunk, alpha)
        assert torch.equal(out.cpu(), C.onebit_unpack(rows[0], rows[1], n, chunk, alpha))


def test_onebit_cuda_unaligned_views_equal_cpu():
    """Buffers that start 4 bytes off a 16-byte boundary (a parameter's view into a bucket) take scalar accesses."""
    n, chunk = 100_003, 2048
    g = torch.Generator().manual_seed(7)
    x, e = torch.randn(n + 1, generator=g), 0.1 * torch.randn(n + 1, generator=g)
    e_cpu = e[1:].clone()
    p_cpu, s_cpu = C.onebit_pack(x[1:].clone(), e_cpu, chunk)
    xg, eg = x.to(DEV), e.to(DEV)
    p_gpu, s_gpu = C.onebit_pack(xg[1:], eg[1:], chunk)
    assert torch.equal(p_gpu.cpu(), p_cpu)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=2e-6, atol=0)
    torch.testing.assert_close(eg[1:].cpu(), e_cpu, rtol=1e-5, atol=1e-6)
    assert float(eg[0]) == float(e[0])  # the element before the view is untouched


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("frac", [0.0, 0.001, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_cuda_equals_cpu(n, frac, dtype):
    g = torch.Generator().manual_seed(n + int(frac * 1000))
    x = torch.randn(n, generator=g)
    e = 0.1 * torch.randn(n, generator=g)
    if n > 20:  # ties straddling the threshold, both signs
        x[::5], e[::5] = 0.75, 0.0
        x[1::10], e[1::10] = -0.75, 0.0
    x = x.to(dtype)
    k = int(frac * n)
    e_cpu, e_gpu = e.clone(), e.to(DEV)
    v_cpu, i_cpu = C.topk_pack(x, e_cpu, k)
    _poison()
    v_gpu, i_gpu = C.topk_pack(x.to(DEV), e_gpu, k)
    assert torch.equal(i_gpu.cpu(), i_cpu)
    assert torch.equal(v_gpu.cpu(), v_cpu)
    assert torch.equal(e_gpu.cpu(), e_cpu)
    rows_v, rows_i = torch.stack([v_cpu, 2 * v_cpu]), torch.stack([i_cpu, i_cpu.flip(0)])
    _poison()
    out = C.topk_unpack(rows_v.to(DEV), rows_i.to(DEV), n, 0.5)
    assert torch.equal(out.cpu(), C.topk_unpack(rows_v, rows_i, n, 0.5))


@pytest.mark.parametrize("alpha", [1.0, 1.0 / 3])
def test_topk_unpack_cuda_equals_cpu_with_overlapping_rows(alpha):
    """Three messages sharing some indices (each row's distinct): sums in row order, then one scale per entry."""
    n, k = 100_003, 20_000
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(n, generator=g)
    shared = perm[:5000]  # in all three rows; the rest of each row its own
    idx = torch.stack([perm[:k], torch.cat([shared, perm[k:2 * k - 5000]]),
                       torch.cat([shared, perm[2 * k:3 * k - 5000]])]).to(torch.int32)
    vals = torch.randn(3, k, generator=g)
    _poison()
    out = C.topk_unpack(vals.to(DEV), idx.to(DEV), n, alpha)
    assert torch.equal(out.cpu(), C.topk_unpack(vals, idx, n, alpha))


def test_topk_cuda_all_equal_keys():
    """Every |c| equal: the threshold digit search ends at the bottom and ties go to the lowest indices."""
    n, k = 70_000, 12_345
    x = torch.ones(n, device=DEV)
    x[1::2] = -1.0
    e = torch.zeros(n, device=DEV)
    v, i = C.topk_pack(x, e, k)
    assert torch.equal(i.cpu(), torch.arange(k, dtype=torch.int32))
    assert torch.equal(v.cpu(), x[:k].cpu())
    assert float(e[:k].abs().sum()) == 0.0 and torch.equal(e[k:], x[k:])
