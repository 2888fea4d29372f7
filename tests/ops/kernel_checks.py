"""Shared checks of the fused-kernel tests: tolerances per dtype and a closeness test that is a relative norm plus
an elementwise bound (so a few wrong near-zero entries cannot hide inside a good norm)."""
import pytest
import torch

from megallama.ops import _extension

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def require_kernels():
    """The fused tests must exercise the kernels: a missing build is a failure, not a silent reference run."""
    _extension.set_fused_kernels(True)
    assert _extension.load(), "megallama kernels failed to load (see the RuntimeWarning for the build error)"


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = ""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    err = (o - r).norm() / r.norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative norm error {err:.3e} > {tol:.0e}"
    rms = r.pow(2).mean().sqrt()
    bad = (o - r).abs() > 4 * tol * (r.abs() + rms)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, e.g. {o[bad][:3].tolist()} vs {r[bad][:3].tolist()}"


def grads(fn, inputs, dy):
    """Output and input grads of fn(*inputs) for upstream grad dy (inputs are leaves, cloned here)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def assert_matches(fn, ref, inputs, dy, tol: float, names):
    """fn's output and input grads (see ``grads``) equal ref's within tol; ``names``: the output's, then each
    input's grad's."""
    y, dxs = grads(fn, inputs, dy)
    y_ref, dxs_ref = grads(ref, inputs, dy)
    for got, want, name in zip([y, *dxs], [y_ref, *dxs_ref], names, strict=True):
        assert_close(got, want, tol, name)


@pytest.fixture(scope="module", autouse=False)
def kernels():
    require_kernels()
    yield
    _extension.set_fused_kernels(True)
