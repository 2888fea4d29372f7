"""ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding at tp=2 equal nn.Linear / nn.Embedding
(forward, input grads, weight and bias grads), with and without sequence parallelism; the fused q/k/v-style
``column_parallel_linears`` equals separate layers and issues one collective per direction; a TP model's forward
and backward issue exactly the collectives the design promises (one all-gather per block under SP)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from dist_utils import rel_err, run_distributed
from megallama.model import build_model
from megallama.mpu import allreduce_sequence_parallel_gradients
from megallama.mpu import mappings
from megallama.mpu import parallel_state as ps
from megallama.mpu.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  column_parallel_linear_forward, column_parallel_linears)
from tp_helpers import MHA

B, S, H, F, V = 2, 4, 8, 12, 16
TOL = 1e-12  # float64 throughout: the sharded math must agree to rounding


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b):
    return rel_err(a, b) < TOL


def _check(errors, tag, pairs):
    """Record ``tag: what`` for each (what, got, want) that differs beyond rounding."""
    errors.extend(f"{tag}: {what}" for what, got, want in pairs if not _close(got, want))


def _reference_linear(d_in, d_out, seed):
    """A seeded float64 nn.Linear, an input X, an output grad G, and X's grad under the loss (ref(X) * G).sum()."""
    ref = nn.Linear(d_in, d_out, bias=True, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_rand(d_out, d_in, seed=seed)), ref.bias.copy_(_rand(d_out, seed=seed + 1))
    X, G = _rand(B, S, d_in, seed=seed + 2), _rand(B, S, d_out, seed=seed + 3)
    Xr = X.clone().requires_grad_()
    (ref(Xr) * G).sum().backward()
    return ref, X, G, Xr.grad


def _column(sp, gather_output, errors):
    r, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    ref, X, G, dX = _reference_linear(H, F, seed=1)
    layer = ColumnParallelLinear(H, F, bias=True, gather_output=gather_output, sequence_parallel=sp,
                                 dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(ref.weight.chunk(n, 0)[r]), layer.bias.copy_(ref.bias.chunk(n, 0)[r])
    x = (X.chunk(n, 1)[r] if sp else X).clone().requires_grad_()
    y = layer(x)
    want = ref(X) if gather_output else ref(X).chunk(n, -1)[r]
    (y * (G if gather_output else G.chunk(n, -1)[r])).sum().backward()
    _check(errors, f"column sp={sp} gather={gather_output}", [
        ("output", y, want), ("input grad", x.grad, dX.chunk(n, 1)[r] if sp else dX),
        ("weight grad", layer.weight.grad, ref.weight.grad.chunk(n, 0)[r]),
        ("bias grad", layer.bias.grad, ref.bias.grad.chunk(n, 0)[r])])


def _row(sp, input_is_parallel, errors):
    r, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    ref, X, G, dX = _reference_linear(F, H, seed=5)
    layer = RowParallelLinear(F, H, bias=True, input_is_parallel=input_is_parallel, sequence_parallel=sp,
                              dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(ref.weight.chunk(n, 1)[r]), layer.bias.copy_(ref.bias)
    x = (X.chunk(n, -1)[r] if input_is_parallel else X).clone().requires_grad_()
    y = layer(x)
    want = ref(X).chunk(n, 1)[r] if sp else ref(X)
    (y * (G.chunk(n, 1)[r] if sp else G)).sum().backward()
    allreduce_sequence_parallel_gradients(layer)  # the bias saw only this rank's tokens under SP
    _check(errors, f"row sp={sp} input_is_parallel={input_is_parallel}", [
        ("output", y, want), ("input grad", x.grad, dX.chunk(n, -1)[r] if input_is_parallel else dX),
        ("weight grad", layer.weight.grad, ref.weight.grad.chunk(n, 1)[r]),
        ("bias grad", layer.bias.grad, ref.bias.grad)])


def _embedding(sp, errors):
    r, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    ref = nn.Embedding(V, H, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_rand(V, H, seed=9))
    layer = VocabParallelEmbedding(V, H, sequence_parallel=sp, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(ref.weight.chunk(n, 0)[r])
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(10))
    G = _rand(B, S, H, seed=11)
    (ref(ids) * G).sum().backward()
    y = layer(ids)
    (y * (G.chunk(n, 1)[r] if sp else G)).sum().backward()
    _check(errors, f"embedding sp={sp}", [("output", y, ref(ids).chunk(n, 1)[r] if sp else ref(ids)),
                                          ("weight grad", layer.weight.grad, ref.weight.grad.chunk(n, 0)[r])])


class _Count:
    """Wraps the collectives the mappings use; counts calls per kind."""

    def __init__(self):
        self.n = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self.saved = (mappings._ALL_GATHER, mappings._REDUCE_SCATTER, dist.all_reduce)

        def wrap(kind, fn):
            def f(*a, **k):
                self.n[kind] += 1
                return fn(*a, **k)
            return f
        mappings._ALL_GATHER = wrap("all_gather", self.saved[0])
        mappings._REDUCE_SCATTER = wrap("reduce_scatter", self.saved[1])
        dist.all_reduce = wrap("all_reduce", self.saved[2])

    def take(self):
        out, self.n = self.n, {k: 0 for k in self.n}
        return out

    def restore(self):
        mappings._ALL_GATHER, mappings._REDUCE_SCATTER, dist.all_reduce = self.saved


def _fused_group(sp, errors):
    """Three layers through column_parallel_linears == three separate calls; one collective each way."""
    r, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    layers = [ColumnParallelLinear(H, F, sequence_parallel=sp, dtype=torch.float64) for _ in range(3)]
    for i, layer in enumerate(layers):
        with torch.no_grad():
            layer.weight.copy_(_rand(F, H, seed=20 + i).chunk(n, 0)[r])
    X = _rand(B, S, H, seed=30)
    Gs = [_rand(B, S, F, seed=31 + i).chunk(n, -1)[r] for i in range(3)]
    x1 = (X.chunk(n, 1)[r] if sp else X).clone().requires_grad_()
    sum((layer(x1) * g).sum() for layer, g in zip(layers, Gs)).backward()
    g_sep = [layer.weight.grad.clone() for layer in layers]
    for layer in layers:
        layer.weight.grad = None
    x2 = x1.detach().clone().requires_grad_()
    count = _Count()
    try:
        outs = column_parallel_linears(x2, layers)
        fwd = count.take()
        sum((o * g).sum() for o, g in zip(outs, Gs)).backward()
        bwd = count.take()
    finally:
        count.restore()
    if not _close(x2.grad, x1.grad) or not all(_close(layer.weight.grad, g) for layer, g in zip(layers, g_sep)):
        errors.append(f"fused column group sp={sp}: grads differ from separate layers")
    want_fwd = {"all_gather": 1 if sp else 0, "reduce_scatter": 0, "all_reduce": 0}
    want_bwd = {"all_gather": 1 if sp else 0, "reduce_scatter": 1 if sp else 0, "all_reduce": 0 if sp else 1}
    if fwd != want_fwd or bwd != want_bwd:
        errors.append(f"fused column group sp={sp}: collectives fwd {fwd} bwd {bwd}")


def _model_collectives(sp, errors):
    """Per block under SP: one all-gather before q/k/v and one before gate/up, a reduce-scatter after o_proj and
    after down_proj; the head gathers once; no all-reduce of activations at all."""
    cfg = MHA
    model = build_model(cfg, seed=3, sequence_parallel=sp)
    ids = torch.randint(0, cfg.vocab_size, (B, 8), generator=torch.Generator().manual_seed(0))
    count = _Count()
    try:
        logits = model(ids)
        fwd = count.take()
        logits.float().pow(2).sum().backward()
        bwd = count.take()
        allreduce_sequence_parallel_gradients(model)
        sync = count.take()
    finally:
        count.restore()
    k = 2 * cfg.num_layers + 1  # column groups (2 per layer + head) == row layers (2 per layer) + embedding
    if sp:
        want = ({"all_gather": k, "reduce_scatter": k, "all_reduce": 0},
                {"all_gather": 2 * k, "reduce_scatter": k, "all_reduce": 0},
                {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 1})
    else:
        want = ({"all_gather": 0, "reduce_scatter": 0, "all_reduce": k},
                {"all_gather": 0, "reduce_scatter": 0, "all_reduce": k},
                {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0})
    if (fwd, bwd, sync) != want:
        errors.append(f"model sp={sp}: collectives fwd {fwd} bwd {bwd} sp-grad-sync {sync}, want {want}")
    if sp and logits.shape[1] != 8:
        errors.append("model sp: logits must cover the full sequence")


def _job(rank, world):
    ps.initialize_model_parallel(2)
    errors = []
    for sp in (False, True):
        for flag in (False, True):
            _column(sp, flag, errors)
            _row(sp, flag, errors)
        _embedding(sp, errors)
        _fused_group(sp, errors)
        _model_collectives(sp, errors)
    return errors


def test_tp2_layers_match_dense_and_collective_counts():
    out = run_distributed(_job, 2)
    errors = [f"rank {r}: {e}" for r in sorted(out) for e in out[r]]
    assert not errors, "\n".join(errors)


def test_column_parallel_linear_under_autocast_keeps_fp32_grads():
    """The fused column function casts by hand under autocast: bf16 output, fp32 param grads near the fp32 ones."""
    torch.manual_seed(0)
    w = torch.randn(12, 8, requires_grad=True)
    x = torch.randn(2, 4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,) = column_parallel_linear_forward(x, (w,))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    w2, x2 = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    (x2 @ w2.t()).sum().backward()
    assert rel_err(w.grad, w2.grad) < 2e-2 and rel_err(x.grad, x2.grad) < 2e-2



class _Adapted(ColumnParallelLinear):
    """The adapter protocol column_parallel_linears honours (LoRA's layers implement it)."""

    merged = False

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.extra = nn.Parameter(torch.randn(F, H, dtype=torch.float64) * 0.1)

    @property
    def base_weight(self):
        return self._parameters["weight"]

    def adapter_forward(self, x):
        return x @ self.extra.t()


def test_fused_column_linears_run_adapters_on_the_same_input():
    torch.manual_seed(0)
    plain = ColumnParallelLinear(H, F, dtype=torch.float64)
    adapted = _Adapted(H, F, dtype=torch.float64)
    for layer in (plain, adapted):
        with torch.no_grad():
            layer.weight.normal_()
    x = torch.randn(B, S, H, dtype=torch.float64, requires_grad=True)
    y_plain, y_adapted = column_parallel_linears(x, (plain, adapted))
    assert torch.allclose(y_plain, x @ plain.weight.t())
    assert torch.allclose(y_adapted, x @ (adapted.weight + adapted.extra).t())
    y_adapted.sum().backward()
    assert adapted.extra.grad is not None and adapted.weight.grad is not None and plain.weight.grad is None


def _saved_input_bytes(fn, x):
    """Bytes of tensors sharing x's storage that autograd saves while fn(x) runs forward."""
    hits = []

    def pack(t):
        if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            hits.append(t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return sum(hits), out


@pytest.mark.parametrize("kind", ["column", "row"])
def test_frozen_weight_keeps_no_input(kind):
    """The input of a GEMM serves only its weight gradient: with the weight frozen (LoRA's base) the Function
    must not keep it alive, and the input gradient stays bit for bit the same."""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(H, F) if kind == "column" else RowParallelLinear(H, F)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(B, S, H)
    grads = {}
    for frozen in (False, True):
        layer.weight.requires_grad_(not frozen)
        xi = x.clone().requires_grad_()
        fn = (lambda t: column_parallel_linears(t, (layer,))[0]) if kind == "column" else layer
        saved, y = _saved_input_bytes(fn, xi)
        assert (saved == 0) == frozen, (frozen, saved)
        y.square().sum().backward()
        grads[frozen] = xi.grad
    assert torch.equal(grads[False], grads[True])
