"""gemm_accum_fp32_: out (fp32) += a^T b summed in fp32, the csrc op (CPU here; CUDA in the gpu test) against the
fp64 math and the reference, including strided operands, repeated accumulation and its error messages."""
import pytest
import torch

from kernel_checks import require_kernels
from megallama.ops import _extension
from megallama.ops.gemm import gemm_accum_fp32_, gemm_accum_fp32_reference, gemm_accum_path


def _operands(n, m, k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, m, generator=g).to(dtype).to(device)
    b = torch.randn(n, k, generator=g).to(dtype).to(device)
    out = torch.randn(m, k, generator=g).to(device)
    return out, a, b


def _exact(out, a, b):
    return out.double() + a.double().t() @ b.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_op_equals_reference_and_fp64_math(dtype):
    require_kernels()
    assert _extension.has_op("gemm_accum_fp32_"), "the kernel library lacks gemm_accum_fp32_"
    out, a, b = _operands(300, 70, 45, dtype)
    exact = _exact(out, a, b)
    ref = out.clone()
    gemm_accum_fp32_reference(ref, a, b)
    torch.ops.megallama.gemm_accum_fp32_(out, a, b)
    assert torch.equal(out, ref)  # the CPU kernel is the reference's math
    assert ((out.double() - exact).norm() / exact.norm()) < 1e-6  # fp32 sums of exact 16-bit products


def test_front_door_takes_the_fused_path_on_cpu_and_accumulates():
    require_kernels()
    out, a, b = _operands(64, 33, 17, torch.bfloat16)
    assert gemm_accum_path(out, a, b) == "fused"
    exact = out.double()
    for s in range(0, 64, 16):  # chunked, as the fused head does
        gemm_accum_fp32_(out, a[s:s + 16], b[s:s + 16])
        exact = exact + a[s:s + 16].double().t() @ b[s:s + 16].double()
    assert ((out.double() - exact).norm() / exact.norm()) < 1e-6


def test_strided_operands():
    """Row slices and transposed views (unit stride along the other dimension) give the same sums."""
    require_kernels()
    out, a, b = _operands(40, 24, 12, torch.bfloat16)
    big_a = torch.zeros(40, 50, dtype=torch.bfloat16)
    big_a[:, 3:27] = a
    a_t = a.t().contiguous().t()  # column-major a
    ref = out.clone()
    gemm_accum_fp32_reference(ref, a, b)
    for aa in (big_a[:, 3:27], a_t):
        o = out.clone()
        torch.ops.megallama.gemm_accum_fp32_(o, aa, b)
        assert torch.equal(o, ref)


def test_same_dtype_and_empty_operands():
    out, a, b = _operands(10, 4, 3, torch.float64)
    out = out.double()
    exact = _exact(out, a, b)
    gemm_accum_fp32_(out, a, b)  # fp64 head path: a plain addmm_
    assert torch.allclose(out, exact)
    out, a, b = _operands(0, 4, 3, torch.bfloat16)
    before = out.clone()
    gemm_accum_fp32_(out, a, b)
    assert torch.equal(out, before)


def test_bad_inputs_name_the_problem():
    require_kernels()
    out, a, b = _operands(10, 4, 3, torch.bfloat16)
    with pytest.raises(ValueError, match="expected fp32 out"):
        gemm_accum_fp32_(out.bfloat16(), a, b.float())
    with pytest.raises(ValueError, match=r"a \[N, M\]"):
        gemm_accum_fp32_(out, a[:9], b)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.megallama.gemm_accum_fp32_(out.t().contiguous(), a, b)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.megallama.gemm_accum_fp32_(out.t().contiguous().t(), a, b)
    with pytest.raises(RuntimeError, match="share one of"):
        torch.ops.megallama.gemm_accum_fp32_(out, a.double(), b.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_op_sums_in_fp32(dtype):
    """The cuBLAS path (beta = 1, fp32 C) against fp64 math: fp32-accurate like the CPU kernel, and far closer than
    the 16-bit product + add it replaces."""
    require_kernels()
    out, a, b = _operands(4096, 1000, 768, dtype, "cuda")
    assert gemm_accum_path(out, a, b) == "fused", "the CUDA build lacks the cuBLAS gemm_accum kernel"
    exact = _exact(out.cpu(), a.cpu(), b.cpu())
    fused, cpu, old = out.clone(), out.cpu(), out.clone()
    gemm_accum_fp32_(fused, a, b)
    torch.ops.megallama.gemm_accum_fp32_(cpu, a.cpu(), b.cpu())
    old += a.t() @ b
    err = lambda x: float((x.cpu().double() - exact).norm() / exact.norm())  # noqa: E731
    # fp32 sums of 4096 exact products: ~sqrt(4096) x 2^-24 relative (H100: 4.4e-6 and 4.9e-6; MKL's CPU sums 1.5e-7)
    assert err(fused) < 2e-5 and err(cpu) < 2e-5, (err(fused), err(cpu))
    assert err(fused) < err(old) / 4, (err(fused), err(old))  # the 16-bit product is rounded once per call
    sliced = out.clone()  # a column block of a wider matrix: row stride 2000, not 1000
    gemm_accum_fp32_(sliced, torch.cat([a, a], 1)[:, :1000], b)
    assert err(sliced) < 2e-5, err(sliced)  # cuBLAS may pick another kernel for another leading dimension
