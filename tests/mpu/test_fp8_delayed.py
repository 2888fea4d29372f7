"""Delayed scaling (mpu/fp8_delayed.py) in one process: Transformer Engine's scale rule, the history's order, the
layers casting with the history's scales and recording amaxes (not without autograd, the same under recompute),
resized loads; on CUDA the compiled phases equal the CPU twin."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dist_utils import rel_err
from megallama.mpu.fp8 import E4M3, E5M2, Fp8Recipe, amax, dequantize, enable_fp8, quantize
from megallama.mpu.fp8_delayed import GRAD, INPUT, WEIGHT, Fp8Meta, load_fp8_meta, update_fp8_scales
from test_fp8_linear import _inputs, _layers, _run

DELAYED = Fp8Recipe("hybrid", recipe="delayed", amax_history_len=3, amax_compute_algo="max")


class _Holder(torch.nn.Module):
    def __init__(self, *metas):
        super().__init__()
        self.mods = torch.nn.ModuleList(torch.nn.Module() for _ in metas)
        for m, meta in zip(self.mods, metas):
            m.fp8_meta = meta


def test_history_and_scales_follow_transformer_engines_rule():
    meta = Fp8Meta(DELAYED, "cpu")
    assert torch.equal(meta.scale, torch.ones(3))  # the first step casts with scale 1 (TE's start)
    model = _Holder(meta)
    seen = []
    for a in ([2.0, 0.5, 1.0], [4.0, 0.25, 0.0], [1.0, 0.125, float("inf")], [0.5, 1.0, 3.0]):
        meta.amax.copy_(torch.tensor(a))
        prev = meta.scale.clone()
        assert update_fp8_scales([model]) == 1
        seen.append(a)
        window = torch.tensor(seen[-3:]).flip(0)  # newest first
        assert torch.equal(meta.amax_history, torch.cat([window, torch.zeros(3 - len(window), 3)]))
        assert torch.equal(meta.amax, torch.zeros(3))
        used = window.amax(0)
        fresh = torch.tensor([448.0, 448.0, 57344.0]) / used
        expect = torch.where((used > 0) & torch.isfinite(used), fresh, prev)
        assert torch.equal(meta.scale, expect), (a, meta.scale, expect)
    for g in (2.0, 1.0):  # the inf leaves the 3-step window: the gradient's scale follows its history again
        meta.amax.copy_(torch.tensor([1.0, 1.0, g]))
        update_fp8_scales([model])
    assert meta.scale[GRAD] == torch.tensor(57344.0) / 3.0
    recent = Fp8Meta(Fp8Recipe("e4m3", 1, "delayed", 2, "most_recent"), "cpu")
    recent.amax.copy_(torch.tensor([8.0, 2.0, 4.0]))
    update_fp8_scales([_Holder(recent)])
    recent.amax.copy_(torch.tensor([2.0, 1.0, 1.0]))
    update_fp8_scales([_Holder(recent)])
    assert torch.equal(recent.scale, torch.tensor([448 / 2 / 2, 448 / 1 / 2, 448 / 1 / 2]))  # e4m3, margin 1


def test_delayed_linears_cast_with_the_history_scales_and_record_amaxes():
    layers = _layers(DELAYED)
    metas = [lin.fp8_meta for lin in layers]
    x, h, dys = _inputs()
    scales = [torch.tensor([30.0 + i, 2000.0 + 100 * i, 5e4 + i]) for i in range(3)]
    for meta, s in zip(metas, scales):
        meta.scale.copy_(s)
    outs = _run(layers, x, h, dys)

    def qd(t, s, dtype=E4M3):
        return dequantize(quantize(t, s, dtype), s).double()
    xq, hq = qd(x.detach(), scales[0][INPUT]), qd(h.detach(), scales[2][INPUT])  # q/k/v-like: the first's scale
    wq = [qd(lin.weight.detach(), s[WEIGHT]) for lin, s in zip(layers, scales)]
    gq = [qd(d, s[GRAD], E5M2) for d, s in zip(dys, scales)]
    for out, ref in zip(outs, (xq @ wq[0].t(), xq @ wq[1].t(), hq @ wq[2].t())):
        assert rel_err(out, ref) < 1e-6
    assert rel_err(x.grad, gq[0] @ wq[0] + gq[1] @ wq[1]) < 1e-6
    for lin, g, inp in zip(layers, gq, (xq, xq, hq)):
        assert rel_err(lin.weight.grad, g.flatten(0, 1).t() @ inp.flatten(0, 1)) < 1e-6
    for meta, lin, inp, dy in zip(metas, layers, (x, x, h), dys):
        assert torch.equal(meta.amax, torch.stack([amax(inp.detach()), amax(lin.weight.detach()), amax(dy)]))
        meta.amax.zero_()
    with torch.no_grad():  # evaluation: the scales are used, nothing is recorded
        _ = [lin(inp) for lin, inp in zip(layers, (x, x, h))]
    assert all(torch.equal(m.amax, torch.zeros(3)) for m in metas)
    assert torch.equal(metas[0].scale, scales[0])  # nothing changes the scales but update_fp8_scales


def test_recompute_casts_with_the_same_scales_and_records_once():
    x, h, dys = _inputs()
    plain = _layers(DELAYED)
    _run(plain, x, h, dys)
    ref_grads = [lin.weight.grad.clone() for lin in plain]
    ref_amax = [lin.fp8_meta.amax.clone() for lin in plain]
    again = _layers(DELAYED)
    gate, up, down = again
    outs = checkpoint(lambda a, b: (gate(a), up(a), down(b)), x, h, use_reentrant=False)
    torch.autograd.backward(outs, dys)
    for lin, g, a in zip(again, ref_grads, ref_amax):
        assert torch.equal(lin.weight.grad, g) and torch.equal(lin.fp8_meta.amax, a)


def test_saved_history_loads_into_any_length():
    saved = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 1  # newest first
    short = Fp8Meta(DELAYED, "cpu")  # length 3: the 3 newest kept
    load_fp8_meta(short, saved, torch.full((3,), 7.0))
    assert torch.equal(short.amax_history, saved[:3])
    assert torch.equal(short.scale, torch.tensor([448.0, 448.0, 57344.0]) / saved[:3].amax(0))
    long = Fp8Meta(Fp8Recipe("hybrid", recipe="delayed", amax_history_len=6), "cpu")
    load_fp8_meta(long, saved, torch.full((3,), 7.0))
    assert torch.equal(long.amax_history, torch.cat([saved, torch.zeros(2, 3)]))
    assert torch.equal(long.scale, torch.tensor([448.0, 448.0, 57344.0]) / saved[0])  # most_recent


def test_switching_recipes_gives_or_drops_the_state():
    layers = _layers(DELAYED)
    assert all(isinstance(lin.fp8_meta, Fp8Meta) and lin.weight.fp8_meta is lin.fp8_meta for lin in layers)
    enable_fp8(torch.nn.ModuleList(layers), Fp8Recipe())
    assert all(lin.fp8_meta is None for lin in layers)


@pytest.mark.gpu
def test_cuda_delayed_fp8_linears_equal_the_cpu_twin():
    """The compiled phases with the delayed scales and amax records: the same records as the CPU path and results
    within accumulation differences (fast accumulation in the forward)."""
    outs = {}
    for dev in ("cpu", "cuda"):
        layers = _layers(DELAYED, dev)
        for i, lin in enumerate(layers):
            lin.fp8_meta.scale.copy_(torch.tensor([30.0 + i, 2000.0 + 100 * i, 5e4 + i]))
        x, h, dys = _inputs(dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            y = _run(layers, x, h, [d.bfloat16() for d in dys])
        outs[dev] = [t.detach().float().cpu() for t in (*y, x.grad, h.grad, *(lin.weight.grad for lin in layers))]
        outs[dev].append(torch.stack([lin.fp8_meta.amax for lin in layers]).cpu())
        update_fp8_scales([torch.nn.ModuleList(layers)])
        outs[dev].append(torch.stack([lin.fp8_meta.scale for lin in layers]).cpu())
    assert torch.equal(outs["cpu"][-2], outs["cuda"][-2]) and torch.equal(outs["cpu"][-1], outs["cuda"][-1])
    for a, b in zip(outs["cpu"][:-2], outs["cuda"][:-2]):
        assert rel_err(b, a) < 1e-2
