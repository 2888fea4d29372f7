"""The fused RoPE (C++ CPU kernel) equals the PyTorch reference for both layouts, both table shapes, Llama 3.1
scaled frequencies, non-contiguous inputs and in-place use; its backward is the inverse rotation."""
import pytest
import torch
from kernel_checks import TOL, assert_close, assert_matches, kernels  # noqa: F401

from megallama.config import RopeScaling
from megallama.ops import apply_rope
from megallama.ops.rope import apply_rope_reference, rope_cos_sin, rope_frequencies

pytestmark = pytest.mark.usefixtures("kernels")


def _tables(b, s, d, per_batch=False, scaling=None, theta=5e5):
    inv = rope_frequencies(d, theta, scaling)
    if per_batch:  # e.g. packed sequences: positions restart per document
        pos = torch.stack([torch.randperm(4 * s)[:s] for _ in range(b)])
    else:
        pos = torch.arange(s) * 37  # large positions make the scaled/unscaled difference visible
    return rope_cos_sin(inv, pos)


def _fused(x, cos, sin, layout="bshd"):
    return apply_rope(x, cos, sin, layout=layout)


def _reference(x, cos, sin, layout="bshd"):
    if layout == "bhsd":
        return apply_rope_reference(x.transpose(1, 2), cos, sin).transpose(1, 2)
    return apply_rope_reference(x, cos, sin)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_matches_reference(head_dim, dtype, layout):
    b, s, h = 2, 5, 3
    shape = (b, s, h, head_dim) if layout == "bshd" else (b, h, s, head_dim)
    x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    cos, sin = _tables(b, s, head_dim)
    assert_matches(lambda t: _fused(t, cos, sin, layout), lambda t: _reference(t, cos, sin, layout), (x,), dy,
                   TOL[dtype], ("y", "dx"))


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_tables_and_llama31_scaling(per_batch, scaled):
    b, s, h, d = 3, 7, 2, 64
    scaling = RopeScaling() if scaled else None
    cos, sin = _tables(b, s, d, per_batch=per_batch, scaling=scaling)
    x, dy = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    assert_matches(lambda t: _fused(t, cos, sin), lambda t: _reference(t, cos, sin), (x,), dy, 1e-5, ("y", "dx"))


def test_backward_is_inverse_rotation():
    x = torch.randn(2, 4, 3, 32, dtype=torch.float64)
    angle = torch.rand(4, 16, dtype=torch.float64) * 100  # fp64 tables: cos^2 + sin^2 = 1 to fp64 precision
    cos, sin = angle.cos(), angle.sin()
    y = torch.ops.megallama.rope_fwd(x, cos, sin, False)
    back = torch.ops.megallama.rope_fwd(y, cos, sin, True)
    assert_close(back, x, 1e-12)


def test_non_contiguous_views():
    """q sliced out of a packed qkv projection (strided heads), and a permuted copy with non-unit head_dim stride."""
    b, s, h, d = 2, 6, 4, 32
    qkv = torch.randn(b, s, 3 * h, d)
    q = qkv[:, :, h:2 * h]  # heads strided inside each token
    cos, sin = _tables(b, s, d)
    for x in (q, q.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not x.is_contiguous()
        dy = torch.randn(x.shape)
        assert_matches(lambda t: _fused(t, cos, sin), lambda t: _reference(t, cos, sin), (x,), dy, 1e-5, ("y", "dx"))


def test_bhsd_output_keeps_layout():
    x = torch.randn(2, 3, 5, 16).transpose(1, 2).contiguous().transpose(1, 2)  # a [b, h, s, d] view of bshd memory
    cos, sin = _tables(2, 5, 16)
    y = apply_rope(x, cos, sin, layout="bhsd")
    assert y.stride() == x.stride()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_inplace(layout):
    x = torch.randn(2, 5, 3, 64).to(torch.bfloat16)
    cos, sin = _tables(2, 5 if layout == "bshd" else 3, 64)
    ref = _reference(x, cos, sin, layout)
    out = apply_rope(x, cos, sin, layout=layout, inplace=True)
    assert out is x
    assert_close(x, ref, 1e-2)
    with pytest.raises(ValueError, match="inplace"):
        apply_rope(torch.randn(2, 5, 3, 64, requires_grad=True), cos, sin, layout=layout, inplace=True)


def test_gradcheck_fp64():
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(2, 3, 8)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))


def test_torch_compile_and_meta():
    x, dy = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)
    cos, sin = _tables(2, 4, 16)
    compiled = torch.compile(lambda t: apply_rope(t, cos, sin) + 1, backend="aot_eager", fullgraph=True)
    assert_matches(compiled, lambda t: _reference(t, cos, sin) + 1, (x,), dy, 1e-5, ("y", "dx"))
    m = apply_rope(torch.empty(2, 4, 3, 16, device="meta"), cos.to("meta"), sin.to("meta"))
    assert m.device.type == "meta" and m.shape == (2, 4, 3, 16)


def test_bad_layout_raises():
    with pytest.raises(ValueError, match="layout"):
        apply_rope(torch.randn(1, 2, 1, 4), *_tables(1, 2, 4), layout="sbhd")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_qk_in_one_call(layout):
    """q and k (GQA: fewer k heads) in one kernel call equal two reference calls, forward and backward."""
    from megallama.ops import apply_rope_qk

    b, s, d = 2, 6, 64
    q = torch.randn((b, s, 4, d) if layout == "bshd" else (b, 4, s, d)).to(torch.bfloat16)
    k = torch.randn((b, s, 2, d) if layout == "bshd" else (b, 2, s, d)).to(torch.bfloat16)
    dq, dk = torch.randn(q.shape).to(q.dtype), torch.randn(k.shape).to(k.dtype)
    cos, sin = _tables(b, s, d, per_batch=True)
    qo, ko = (t.detach().requires_grad_() for t in (q, k))
    yq, yk = apply_rope_qk(qo, ko, cos, sin, layout=layout)
    torch.autograd.backward((yq, yk), (dq, dk))
    qr, kr = (t.detach().requires_grad_() for t in (q, k))
    rq, rk = _reference(qr, cos, sin, layout), _reference(kr, cos, sin, layout)
    torch.autograd.backward((rq, rk), (dq, dk))
    for a, r, n in ((yq, rq, "q"), (yk, rk, "k"), (qo.grad, qr.grad, "dq"), (ko.grad, kr.grad, "dk")):
        assert_close(a, r, 1e-2, n)
