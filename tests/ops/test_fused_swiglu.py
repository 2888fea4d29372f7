"""The fused SwiGLU (C++ CPU kernel) equals the PyTorch reference from two tensors or one packed [gate, up]
tensor, forward and backward, and composes with checkpointing (as LlamaMLP uses it), autocast and torch.compile."""
import pytest
import torch
from kernel_checks import TOL, assert_close, assert_matches, kernels  # noqa: F401

from megallama.ops import swiglu, swiglu_packed
from megallama.ops.swiglu import swiglu_reference

pytestmark = pytest.mark.usefixtures("kernels")


def _ref_packed(gu):
    g, u = gu.chunk(2, dim=-1)
    return swiglu_reference(g, u)


@pytest.mark.parametrize("f", [5, 33, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(f, dtype):
    g, u, dy = (4 * torch.randn(2, 3, f)).to(dtype), torch.randn(2, 3, f).to(dtype), torch.randn(2, 3, f).to(dtype)
    assert_matches(swiglu, swiglu_reference, (g, u), dy, TOL[dtype], ("y", "dgate", "dup"))


@pytest.mark.parametrize("f", [5, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed(f, dtype):
    gu, dy = (3 * torch.randn(3, 2, 2 * f)).to(dtype), torch.randn(3, 2, f).to(dtype)
    assert_matches(swiglu_packed, _ref_packed, (gu,), dy, TOL[dtype], ("y", "dgate_up"))


def test_non_contiguous():
    """Halves of a packed tensor passed as two strided views, and a transposed pair."""
    gu = 3 * torch.randn(4, 5, 66)
    for g, u in ((gu[..., :33], gu[..., 33:]), (gu[..., :33].transpose(0, 1), gu[..., 33:].transpose(0, 1))):
        assert not g.is_contiguous()
        dy = torch.randn(g.shape)
        assert_matches(swiglu, swiglu_reference, (g, u), dy, 1e-5, ("y", "dgate", "dup"))


def test_extreme_inputs():
    g = torch.tensor([-1e4, -90.0, -20.0, 0.0, 20.0, 90.0, 1e4])
    u = torch.full_like(g, 0.5)
    assert_close(swiglu(g, u), swiglu_reference(g, u), 1e-6)


def test_gradcheck_fp64():
    g, u = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu, (g.requires_grad_(), u.requires_grad_()))
    gu = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_packed, (gu,))


def test_checkpoint_autocast_compile():
    torch.manual_seed(0)
    gate, up = torch.nn.Linear(24, 40), torch.nn.Linear(24, 40)
    x = torch.randn(3, 4, 24)

    def run(fn, mode):
        gate.zero_grad()
        up.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g, u = gate(x), up(x)
            if mode == "checkpoint":
                y = torch.utils.checkpoint.checkpoint(fn, g, u, use_reentrant=False)
            elif mode == "compile":
                y = torch.compile(fn, backend="aot_eager", fullgraph=True)(g, u)
            else:
                y = fn(g, u)
        (y.float() ** 2).sum().backward()
        return y.detach(), gate.weight.grad.clone(), up.weight.grad.clone()

    ref = run(swiglu_reference, "eager")
    for mode in ("eager", "checkpoint", "compile"):
        for a, b in zip(run(swiglu, mode), ref):
            assert_close(a, b, 1e-2, mode)


def test_meta_and_errors():
    y = swiglu(torch.empty(2, 8, device="meta"), torch.empty(2, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 8)
    assert swiglu_packed(torch.empty(2, 8, device="meta")).shape == (2, 4)
    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.randn(2, 7))
