"""Deferred weight gradients (ZB's B/W split, megallama/mpu/weight_grad_store.py): inside ``capture()`` the parallel
linears give input and bias grads at once and queue their weight grads; ``apply`` then yields the same bits a plain
backward gives, through autograd's accumulation (hooks fire once per parameter). Also at tp 2 with SP, where the
queued work all-gathers the saved sequence shard."""
import pytest
import torch

from dist_utils import rel_err, run_distributed
from megallama.mpu import parallel_state as ps
from megallama.mpu import weight_grad_store
from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, column_parallel_linears

H, F = 16, 24


def _block(seed, bias=False, sequence_parallel=False, device="cpu"):
    torch.manual_seed(seed)
    gate, up = (ColumnParallelLinear(H, F, bias=bias, sequence_parallel=sequence_parallel, device=device)
                for _ in range(2))
    down = RowParallelLinear(F, H, sequence_parallel=sequence_parallel, device=device)
    for lin in (gate, up, down):
        torch.nn.init.normal_(lin.weight, std=0.2)
        if lin.bias is not None:
            torch.nn.init.normal_(lin.bias, std=0.2)
    return gate, up, down


def _forward(layers, x):
    gate, up, down = layers
    g, u = column_parallel_linears(x, [gate, up])
    return down(torch.nn.functional.silu(g) * u)


def _params(layers):
    return [p for lin in layers for p in lin.parameters()]


def _grads(layers, x, defer, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    fired = []  # parameter indices whose hook saw a grad (B also runs a queued weight's hook, with grad None)
    handles = [p.register_post_accumulate_grad_hook(lambda q, i=i: fired.append(i) if q.grad is not None else None)
               for i, p in enumerate(_params(layers))]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = _forward(layers, x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype).to(y.device)
    if defer:
        with weight_grad_store.capture() as pending:
            y.backward(dy)
        after_b = {id(p): p.grad is not None for p in _params(layers)}
        weight_grad_store.apply(pending)
        assert pending == []
    else:
        y.backward(dy)
        after_b = None
    for h in handles:
        h.remove()
    return x.grad, [p.grad.clone() for p in _params(layers)], after_b, fired


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # CUDA: backward runs on autograd's device thread


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("bias", [False, True])
def test_deferred_equals_plain_backward(autocast, bias, device):
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1)).to(device)
    ref_layers, layers = _block(0, bias, device=device), _block(0, bias, device=device)
    gx_ref, grads_ref, _, fired_ref = _grads(ref_layers, x, defer=False, autocast=autocast)
    gx, grads, after_b, fired = _grads(layers, x, defer=True, autocast=autocast)
    assert torch.equal(gx, gx_ref)
    for g, r in zip(grads, grads_ref):
        assert g.dtype == r.dtype == torch.float32 and torch.equal(g, r)
    # B gave the biases their grads and left every weight for W
    for lin in layers:
        assert not after_b[id(lin.weight)]
        if lin.bias is not None:
            assert after_b[id(lin.bias)]
    assert sorted(fired) == sorted(fired_ref)  # each parameter's hook once, as in one backward


def test_no_capture_and_non_leaf_weights_compute_in_b():
    gate, up, down = _block(0)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1))
    y = _forward((gate, up, down), x)
    y.sum().backward()  # no capture: nothing is queued anywhere
    assert all(p.grad is not None for p in _params((gate, up, down)))
    # a weight that is not a leaf (here a scaled copy) cannot be accumulated later: B computes its grad
    w = torch.randn(F, H, requires_grad=True)
    with weight_grad_store.capture() as pending:
        gate(x, weight=w * 2.0).sum().backward()
    assert pending == [] and w.grad is not None


def test_a_parameter_queued_twice_gets_the_sum_once():
    lin = ColumnParallelLinear(H, F)
    torch.nn.init.normal_(lin.weight)
    x1, x2 = (torch.randn(3, H, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    ref = ColumnParallelLinear(H, F)
    ref.weight.data.copy_(lin.weight.data)
    (ref(x1) * 2 + ref(x2)).sum().backward()
    fired = []
    lin.weight.register_post_accumulate_grad_hook(lambda q: fired.append(1) if q.grad is not None else None)
    with weight_grad_store.capture() as pending:
        (lin(x1) * 2 + lin(x2)).sum().backward()
    assert len(pending) == 2 and lin.weight.grad is None
    weight_grad_store.apply(pending)
    assert fired == [1]
    assert rel_err(lin.weight.grad, ref.weight.grad) < 1e-6


def _tp_sp(rank, world):
    ps.initialize_model_parallel(world, 1)
    x_full = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(1))
    shard = x_full.chunk(world, dim=1)[rank]  # [b, s/tp, h]: this rank's sequence shard
    out = {}
    for defer in (False, True):
        layers = _block(0, bias=True, sequence_parallel=True)
        gx, grads, _, _ = _grads(layers, shard, defer)
        out[defer] = (gx, grads)
    return all(torch.equal(a, b) for a, b in zip([out[True][0], *out[True][1]], [out[False][0], *out[False][1]]))


def test_tp2_sequence_parallel_deferred_equals_plain():
    assert all(run_distributed(_tp_sp, 2).values())
