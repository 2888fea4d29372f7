"""The fp8 parallel linears (mpu/fp8_linear.py) against a quantise-dequantise fp32 reference, forward and backward.

The reference casts each operand with its own tensorwise scale (fp8_max / amax), dequantises to fp32 and multiplies
in float64: forward x(e4m3) W(e4m3)^T, dgrad g(e5m2 under hybrid, e4m3 under e4m3) W, wgrad g^T x. The layers give
the same up to fp32 summation (bound 1e-6 relative). 10 tokens: the weight-gradient GEMM's inner dim is padded to
16. Also: the CPU emulation equals torch's own CPU fp8 GEMM; bf16 outputs are the fp32 ones rounded; gradient-
accumulation fusion sums into ``main_grad``; ZB's deferred weight gradients equal the direct ones; bad dims refused.
"""
import pytest
import torch

from dist_utils import rel_err
from megallama.errors import ConfigError
from megallama.mpu import weight_grad_store
from megallama.mpu.fp8 import (E4M3, E5M2, Fp8Recipe, amax, amax_to_scale, dequantize, enable_fp8, quantize,
                               scaled_mm)
from megallama.mpu.grad_accum_fusion import set_gradient_accumulation_fusion
from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, column_parallel_linears

H, F, TOL = 32, 48, 1e-6


def _qd(t, dtype=E4M3, margin=0):
    s = amax_to_scale(amax(t), dtype, margin)
    return dequantize(quantize(t, s, dtype), s).double()


def _layers(recipe, device="cpu"):
    torch.manual_seed(0)
    gate, up, down = ColumnParallelLinear(H, F), ColumnParallelLinear(H, F), RowParallelLinear(F, H)
    for lin in (gate, up, down):
        torch.nn.init.normal_(lin.weight, std=0.05)
    assert enable_fp8(torch.nn.ModuleList([gate, up, down]), recipe) == 3
    return tuple(lin.to(device) for lin in (gate, up, down))  # the same weights on every device


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, H, generator=g) * 3).to(device).requires_grad_(True)
    h = torch.randn(2, 5, F, generator=g).to(device).requires_grad_(True)
    dys = [torch.randn(2, 5, n, generator=g).to(device) for n in (F, F, H)]
    return x, h, dys


def _run(layers, x, h, dys):
    gate, up, down = layers
    outs = (*column_parallel_linears(x, [gate, up]), down(h))
    torch.autograd.backward(outs, dys)
    return outs


@pytest.mark.parametrize("fmt,margin", [("hybrid", 0), ("e4m3", 0), ("hybrid", 2)])
def test_fp8_linears_equal_the_quantize_dequantize_reference(fmt, margin):
    recipe = Fp8Recipe(fmt, margin)
    layers = _layers(recipe)
    x, h, dys = _inputs()
    outs = _run(layers, x, h, dys)
    gd = recipe.grad_dtype
    xq, hq = _qd(x.detach(), margin=margin), _qd(h.detach(), margin=margin)
    wq = [_qd(lin.weight.detach(), margin=margin) for lin in layers]
    gq = [_qd(d, gd, margin) for d in dys]
    refs = (xq @ wq[0].t(), xq @ wq[1].t(), hq @ wq[2].t())
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32 and rel_err(out, ref) < TOL
    assert rel_err(x.grad, gq[0] @ wq[0] + gq[1] @ wq[1]) < TOL
    assert rel_err(h.grad, gq[2] @ wq[2]) < TOL
    for lin, g, inp in zip(layers, gq, (xq, xq, hq)):
        assert rel_err(lin.weight.grad, g.flatten(0, 1).t() @ inp.flatten(0, 1)) < TOL
    # and it is not the 16-bit result: fp8 error is visible at this scale
    assert rel_err(outs[0], x.detach().double() @ layers[0].weight.detach().double().t()) > 1e-3


def test_scales_and_the_cpu_emulation_match_torch():
    t = torch.tensor([0.5, -3.0, 1.0])
    s = amax_to_scale(amax(t), E4M3)
    assert float(s) == pytest.approx(448 / 3) and quantize(t, s, E4M3)[1].item() == -448.0  # amax -> fp8 max
    assert float(amax_to_scale(amax(t), E5M2, margin=1)) == pytest.approx(57344 / 3 / 2)
    assert float(amax_to_scale(amax(torch.zeros(3)), E4M3)) > 0  # an all-zero tensor: finite scale
    assert quantize(torch.tensor([1e9]), torch.tensor(1.0), E4M3).float().item() == 448.0  # saturates, no NaN
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(24, 40, generator=g), torch.randn(40, 32, generator=g) * 0.1
    sa, sb = amax_to_scale(amax(a), E5M2), amax_to_scale(amax(b), E4M3)
    a8, b8 = quantize(a, sa, E5M2), quantize(b, sb, E4M3)
    ours = scaled_mm(a8, b8, sa, sb, torch.float32)
    assert rel_err(ours, scaled_mm(a8, b8, sa, sb, torch.float32, cpu_emulation=False)) < TOL
    assert rel_err(ours, dequantize(a8, sa).double() @ dequantize(b8, sb).double()) < TOL


def test_bf16_autocast_outputs_are_the_fp32_ones_rounded():
    x, h, dys = _inputs()
    dys = [d.bfloat16().float() for d in dys]  # the same values reach the fp8 casts in both runs
    ref = _run(_layers(Fp8Recipe()), x, h, dys)
    grads = [x.grad.clone(), h.grad.clone()]
    x.grad = h.grad = None
    layers = _layers(Fp8Recipe())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = _run(layers, x, h, [d.bfloat16() for d in dys])
    for out, r in zip(outs, ref):
        assert out.dtype == torch.bfloat16 and torch.equal(out, r.detach().bfloat16())
    assert torch.equal(h.grad, grads[1].bfloat16().float())  # one GEMM: its fp32 result rounded
    assert x.grad.dtype == torch.float32 and rel_err(x.grad, grads[0]) < 1e-2  # q/k/v-like sum of bf16 results
    assert layers[0].weight.grad.dtype == torch.float32  # written in the parameter's dtype, no bf16 round trip


def test_weight_grads_sum_into_main_grad_under_gradient_accumulation_fusion():
    x, h, dys = _inputs()
    plain = _layers(Fp8Recipe())
    _run(plain, x, h, dys)
    layers = _layers(Fp8Recipe())
    for lin in layers:
        lin.weight.main_grad = torch.ones_like(lin.weight)
    set_gradient_accumulation_fusion(True, allow_cpu=True)
    try:
        _run(layers, x, h, dys)
    finally:
        set_gradient_accumulation_fusion(True, allow_cpu=False)
    for lin, ref in zip(layers, plain):
        assert lin.weight.grad_added_to_main_grad
        assert rel_err(lin.weight.main_grad, 1 + ref.weight.grad) < TOL


def test_deferred_weight_grads_equal_the_direct_ones():
    x, h, dys = _inputs()
    plain = _layers(Fp8Recipe())
    _run(plain, x, h, dys)
    grads = [x.grad.clone(), h.grad.clone()]
    x.grad = h.grad = None
    layers = _layers(Fp8Recipe())
    with weight_grad_store.capture() as pending:
        _run(layers, x, h, dys)
    assert all(lin.weight.grad is None for lin in layers) and len(pending) == 2
    assert torch.equal(x.grad, grads[0]) and torch.equal(h.grad, grads[1])
    weight_grad_store.apply(pending)
    for lin, ref in zip(layers, plain):
        assert torch.equal(lin.weight.grad, ref.weight.grad)


def test_dims_that_fp8_gemms_cannot_take_are_refused():
    with pytest.raises(ConfigError, match=r"0 has a \[40, 32\] weight .* multiples of 16"):
        enable_fp8(torch.nn.ModuleList([ColumnParallelLinear(32, 40)]), Fp8Recipe())
    with pytest.raises(ConfigError, match="fp8 format 'e5m2' is not one of"):
        Fp8Recipe("e5m2")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_cuda_fp8_linears_equal_the_cpu_twin(fmt):
    """torch._scaled_mm on the GPU (cuBLASLt, column-major second operand, compiled casts) against the CPU path:
    the fp8 bytes are the same, so the results differ by accumulation only (fast accumulation in the forward)."""
    recipe = Fp8Recipe(fmt)
    outs = {}
    for dev in ("cpu", "cuda"):
        layers = _layers(recipe, dev)
        x, h, dys = _inputs(dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            y = _run(layers, x, h, [d.bfloat16() for d in dys])
        outs[dev] = [t.detach().float().cpu() for t in (*y, x.grad, h.grad, *(lin.weight.grad for lin in layers))]
        casts = []
        for t, dt in ((x.detach(), E4M3), (x.detach().bfloat16(), E4M3), (dys[0], E5M2), (dys[0].bfloat16(), E5M2)):
            casts.append(quantize(t, amax_to_scale(amax(t), dt), dt).view(torch.uint8).cpu())
        outs[dev].append(torch.cat([c.flatten() for c in casts]))
    assert torch.equal(outs["cpu"][-1], outs["cuda"][-1])  # the same fp8 bytes (the compiled cast rounds as eager)
    for a, b in zip(outs["cpu"][:-1], outs["cuda"][:-1]):
        assert rel_err(b, a) < 1e-2
