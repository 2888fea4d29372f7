"""The fused RMSNorm (C++ CPU kernel) equals the PyTorch reference, forward and backward, and composes with
autograd, checkpointing, autocast, torch.compile and meta tensors."""
import importlib

import pytest
import torch
from kernel_checks import TOL, assert_close, assert_matches, grads, kernels  # noqa: F401

from megallama.ops import _extension, rms_norm
from megallama.ops.rms_norm import rms_norm_fused, rms_norm_reference

rms_mod = importlib.import_module("megallama.ops.rms_norm")  # the module (the package attribute is the function)
pytestmark = pytest.mark.usefixtures("kernels")
EPS = 1e-5


def _inputs(shape, dtype, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype) * 3
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(wdtype or dtype)
    dy = torch.randn(shape, generator=g)
    return x, w, dy


@pytest.mark.parametrize("hidden", [5, 33, 4100])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                          (torch.bfloat16, torch.float32)])
def test_matches_reference(hidden, dtype, wdtype):
    x, w, dy = _inputs((2, 3, hidden), dtype, wdtype)
    out_dtype = torch.promote_types(x.dtype, w.dtype)
    dy = dy.to(out_dtype)
    assert_matches(lambda a, b: rms_norm_fused(a, b, EPS), lambda a, b: rms_norm_reference(a, b, EPS), (x, w), dy,
                   TOL[dtype], ("y", "dx", "dweight"))


def test_fp32_against_fp64_truth():
    """fp32 kernel vs the math in fp64 (not just vs the fp32 reference)."""
    x, w, dy = _inputs((7, 257), torch.float32)
    y, (dx, dw) = grads(lambda a, b: rms_norm_fused(a, b, EPS), (x, w), dy)
    y64, (dx64, dw64) = grads(lambda a, b: rms_norm_reference(a, b, EPS), (x.double(), w.double()), dy.double())
    for a, b, n in ((y, y64, "y"), (dx, dx64, "dx"), (dw, dw64, "dw")):
        assert_close(a.double(), b, 1e-6, n)


@pytest.mark.parametrize("layout", ["row_stride", "transposed", "expanded"])
def test_non_contiguous(layout):
    base, w, _ = _inputs((4, 6, 40), torch.float32)
    if layout == "row_stride":
        x = base[..., 3:36]  # rows 40 apart, 33 wide
    elif layout == "transposed":
        x = base[..., :33].transpose(0, 1)
    else:
        x = base[:1, :1, :33].expand(4, 6, 33)
    w = w[:33]
    assert not x.is_contiguous()
    dy = torch.randn(x.shape)
    y, (dx, dw) = grads(lambda a, b: rms_norm_fused(a, b, EPS), (x, w), dy)
    y_ref, (dx_ref, dw_ref) = grads(lambda a, b: rms_norm_reference(a, b, EPS), (x, w), dy)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(dx, dx_ref, 1e-5, "dx")
    assert_close(dw, dw_ref, 1e-5, "dw")
    assert_close(y, rms_norm_fused(x.contiguous(), w, EPS), 1e-6, "same as contiguous")


def test_gradcheck_fp64():
    x, w, _ = _inputs((3, 9), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_fused(a, b, 1e-3),
                                    (x.requires_grad_(), w.requires_grad_()))


def test_saves_only_inverse_rms():
    """Besides the inputs (x, weight) the forward keeps one fp32 value per row."""
    x, w, _ = _inputs((4, 5, 64), torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        rms_norm_fused(x.requires_grad_(), w.requires_grad_(), EPS)
    assert sorted(saved, key=str) == sorted([((4, 5, 64), torch.bfloat16), ((64,), torch.bfloat16),
                                             ((4, 5), torch.float32)], key=str)


def test_autocast_and_checkpoint():
    """Under CPU autocast a bf16 activation meets an fp32 weight: same (fp32) result as the reference, also when
    recomputed by non-reentrant activation checkpointing."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 48)
    w = torch.nn.Parameter(1 + 0.1 * torch.randn(48))
    inp = torch.randn(3, 5, 48)
    results = []
    for fn in (rms_norm_fused, rms_norm_reference, rms_norm_fused):
        lin.zero_grad()
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(inp)
            if len(results) == 2:
                y = torch.utils.checkpoint.checkpoint(fn, h, w, EPS, use_reentrant=False)
            else:
                y = fn(h, w, EPS)
        assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
        (y.float() ** 2).sum().backward()
        results.append((y.detach(), lin.weight.grad.clone(), w.grad.clone()))
    for got in (results[0], results[2]):
        for a, b in zip(got, results[1]):
            assert_close(a, b, 1e-2)


def test_torch_compile_no_graph_break():
    x, w, dy = _inputs((4, 96), torch.float32)
    compiled = torch.compile(lambda a, b: rms_norm_fused(a, b, EPS) * 2, backend="aot_eager", fullgraph=True)
    assert_matches(compiled, lambda a, b: rms_norm_reference(a, b, EPS) * 2, (x, w), dy, 1e-5, ("y", "dx", "dw"))


def test_meta_device():
    x = torch.empty(2, 7, 64, device="meta", dtype=torch.bfloat16)
    y = rms_norm(x, torch.empty(64, device="meta", dtype=torch.float32), EPS)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == torch.float32


def test_switch_forces_reference(monkeypatch):
    """set_fused_kernels(False) (--no-fused-kernels) must route around the kernel; True must use it."""
    calls = []
    monkeypatch.setattr(rms_mod, "rms_norm_fused", lambda *a: calls.append(1) or rms_norm_reference(*a))
    x, w, _ = _inputs((2, 8), torch.float32)
    try:
        _extension.set_fused_kernels(False)
        rms_norm(x, w, EPS)
        assert calls == []
        _extension.set_fused_kernels(True)
        rms_norm(x, w, EPS)
        assert calls == [1]
    finally:
        _extension.set_fused_kernels(True)


def test_bad_weight_shape_raises():
    with pytest.raises(RuntimeError, match="weight shape"):
        torch.ops.megallama.rms_norm_fwd(torch.randn(2, 8), torch.randn(7), EPS)
