"""The CUDA kernels equal the PyTorch reference (run on the same GPU) forward and backward, on the vectorised and
the scalar paths, with poisoned memory so an unwritten output element cannot pass."""
import pytest
import torch
from kernel_checks import TOL, assert_close, assert_matches, grads, require_kernels

from megallama.config import RopeScaling
from megallama.ops import _extension, apply_rope, apply_rope_qk, swiglu, swiglu_packed
from megallama.ops.rms_norm import rms_norm_fused, rms_norm_reference
from megallama.ops.rope import apply_rope_reference, rope_cos_sin, rope_frequencies
from megallama.ops.swiglu import swiglu_reference

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_kernels():
    require_kernels()
    assert _extension._state["cuda"], "the kernel library was built without its CUDA kernels"


def _poison():
    """Fill the caching allocator's free blocks with NaN so outputs the kernel fails to write show up."""
    free = torch.cuda.mem_get_info()[0]
    blocks = [torch.full((1 << 26,), float("nan"), device=DEV) for _ in range(min(8, free // (1 << 29)))]
    del blocks


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, device=DEV)).to(dtype)


@pytest.mark.parametrize("hidden", [5, 33, 64, 4100, 4096, 8192, 16384])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows", [3, 1500])
def test_rms_norm(hidden, dtype, wdtype, rows):
    x = _randn(rows, hidden, dtype=dtype, scale=3)
    w = (1 + 0.5 * torch.randn(hidden, device=DEV)).to(wdtype or dtype)
    dy = _randn(rows, hidden, dtype=torch.promote_types(x.dtype, w.dtype))
    _poison()
    y, (dx, dw) = grads(lambda a, b: rms_norm_fused(a, b, 1e-5), (x, w), dy)
    y_ref, (dx_ref, dw_ref) = grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w), dy)
    tol = TOL[dtype]
    assert_close(y, y_ref, tol, "y")
    assert_close(dx, dx_ref, tol, "dx")
    assert_close(dw, dw_ref, tol if rows < 1000 or dtype == torch.float32 else 2e-2, "dweight")


def test_rms_norm_strided_and_fp32_truth():
    base = _randn(300, 4104)
    x, w = base[:, 8:], 1 + 0.1 * torch.randn(4096, device=DEV)  # rows 4104 apart, 16-byte aligned
    xo = base[:, 3:4099]  # misaligned: the scalar path
    for inp in (x, xo):
        dy = torch.randn(inp.shape, device=DEV)
        y, (dx, dw) = grads(lambda a, b: rms_norm_fused(a, b, 1e-5), (inp, w), dy)
        y64, (dx64, dw64) = grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (inp.double(), w.double()),
                                  dy.double())
        assert_close(y.double(), y64, 1e-5, "y")
        assert_close(dx.double(), dx64, 1e-5, "dx")
        assert_close(dw.double(), dw64, 1e-5, "dw")


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_rope(head_dim, dtype, layout):
    b, s, h = 2, 33, 5  # odd head count: the two-heads-per-step loop has a remainder
    shape = (b, s, h, head_dim) if layout == "bshd" else (b, h, s, head_dim)
    x, dy = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
    inv = rope_frequencies(head_dim, 5e5, RopeScaling(original_max_position_embeddings=16), device=DEV)
    cos, sin = rope_cos_sin(inv, torch.arange(s, device=DEV) * 11)

    def ref(t):
        if layout == "bhsd":
            return apply_rope_reference(t.transpose(1, 2), cos, sin).transpose(1, 2)
        return apply_rope_reference(t, cos, sin)

    _poison()
    assert_matches(lambda t: apply_rope(t, cos, sin, layout=layout), ref, (x,), dy, TOL[dtype], ("y", "dx"))


def test_rope_per_batch_tables_strided_inplace():
    b, s, h, d = 3, 17, 4, 128
    qkv = _randn(b, s, 3 * h, d, dtype=torch.bfloat16)
    q = qkv[:, :, :h]
    pos = torch.stack([torch.randperm(100, device=DEV)[:s] for _ in range(b)])
    cos, sin = rope_cos_sin(rope_frequencies(d, 1e4, device=DEV), pos)
    ref = apply_rope_reference(q, cos, sin)
    assert_close(apply_rope(q, cos, sin), ref, 1e-2, "strided")
    q2 = q.clone()
    assert apply_rope(q2, cos, sin, inplace=True) is q2
    assert_close(q2, ref, 1e-2, "inplace")


@pytest.mark.parametrize("head_dim,layout", [(128, "bshd"), (128, "bhsd"), (80, "bshd")])
def test_rope_qk_one_launch(head_dim, layout):
    b, s = 3, 29
    qs, ks = ((b, s, 12, head_dim), (b, s, 3, head_dim)) if layout == "bshd" else \
        ((b, 12, s, head_dim), (b, 3, s, head_dim))
    q, k = _randn(*qs, dtype=torch.bfloat16), _randn(*ks, dtype=torch.bfloat16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = rope_cos_sin(rope_frequencies(head_dim, 5e5, device=DEV), torch.arange(s, device=DEV))
    _poison()
    qo, ko = q.clone().requires_grad_(), k.clone().requires_grad_()
    yq, yk = apply_rope_qk(qo, ko, cos, sin, layout=layout)
    torch.autograd.backward((yq, yk), (dq, dk))
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    tr = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    rq, rk = tr(apply_rope_reference(tr(qr), cos, sin)), tr(apply_rope_reference(tr(kr), cos, sin))
    torch.autograd.backward((rq, rk), (dq, dk))
    for a, r, n in ((yq, rq, "q"), (yk, rk, "k"), (qo.grad, qr.grad, "dq"), (ko.grad, kr.grad, "dk")):
        assert_close(a, r, 1e-2, n)


@pytest.mark.parametrize("f", [5, 33, 4100, 14336])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu(f, dtype):
    g, u, dy = _randn(37, f, dtype=dtype, scale=4), _randn(37, f, dtype=dtype), _randn(37, f, dtype=dtype)
    _poison()
    assert_matches(swiglu, swiglu_reference, (g, u), dy, TOL[dtype], ("y", "dgate", "dup"))


@pytest.mark.parametrize("f", [33, 14336])
def test_swiglu_packed_and_strided(f):
    gu, dy = _randn(2, 19, 2 * f, dtype=torch.bfloat16, scale=3), _randn(2, 19, f, dtype=torch.bfloat16)

    def ref(t):
        a, b = t.chunk(2, dim=-1)
        return swiglu_reference(a, b)

    y, (dgu,) = grads(swiglu_packed, (gu,), dy)
    y_ref, (dgu_ref,) = grads(ref, (gu,), dy)
    assert_close(y, y_ref, 1e-2, "y")
    assert_close(dgu, dgu_ref, 1e-2, "dgate_up")
    y2, _ = grads(lambda t: swiglu(t[..., :f], t[..., f:]), (gu,), dy)
    assert_close(y2, y_ref, 1e-2, "views")


def test_cuda_matches_cpu_kernels():
    x, w = torch.randn(64, 333), torch.randn(333)
    assert_close(rms_norm_fused(x.to(DEV), w.to(DEV), 1e-5), rms_norm_fused(x, w, 1e-5), 1e-5)
    g, u = torch.randn(64, 333), torch.randn(64, 333)
    assert_close(swiglu(g.to(DEV), u.to(DEV)), swiglu(g, u), 1e-5)
