"""The tensor-parallel GEMMs in fp8: ``_ColumnParallelLinears`` and ``_RowParallelGEMM`` of ``mpu.layers`` with
their three GEMMs per weight run by ``torch._scaled_mm`` (see ``mpu.fp8`` for the scaling).

    forward  y  = x(e4m3) @ W(e4m3)^T              out: the compute dtype (bf16 under --bf16)
    dgrad    dx = g(e5m2 hybrid / e4m3) @ W(e4m3)   out: the compute dtype
    wgrad    dW = g^T @ x, both fp8                 out: fp32 summed into ``main_grad`` (gradient-accumulation
                                                    fusion's gates), else the parameter's dtype

What is saved for backward is the fp8 input (half the bytes of the bf16 one) and the weight itself, re-cast in
backward with the forward's scale (the same bits; no fp8 weight copy is kept alive across the pipeline). Under
sequence parallelism the input is quantised on its [b, s/tp, h] shard (amax MAX over tp) and the fp8 bytes are
all-gathered: half the traffic of a bf16 gather, as Transformer Engine does. The scales never leave the device (no
host sync). Like the 16-bit Functions, weight gradients are deferrable to a zero-bubble schedule's W pass.

Each phase (forward; input gradient; weight gradients) is one pure function of tensors. On CUDA it runs as one
``torch.compile`` graph: eager, its ~30 small ops per call (amaxes, casts, scale reciprocals, the transposed copies
cuBLASLt's fp8 layout needs) cost more host time than the GEMMs take on the GPU, and the casts fuse with the
transposes. The tensor-parallel reductions of the input gradient stay outside, overlapped with the weight GEMMs.

Delayed scaling (``mpu.fp8_delayed``): a phase takes each linear's scales and this step's amaxes so far as tensors,
casts with those scales and returns the amaxes MAXed with the ones it saw; the caller copies them back into the
linears' state (in place, outside the compiled graph), and only while autograd records (training).
"""
from __future__ import annotations

import warnings

import torch

from megallama.mpu import mappings, weight_grad_store
from megallama.mpu.fp8 import E4M3, Fp8Recipe, amax, amax_to_scale, quantize, reduce_amax, scaled_mm
from megallama.mpu.fp8_delayed import GRAD, INPUT, WEIGHT
from megallama.mpu.grad_accum_fusion import added_to_main_grad, fusable_main_grad

_GRAPHS: dict = {}  # phase function -> its torch.compile wrapper, or False once compiling it failed


def _run(fn, cuda: bool, *args):
    """``fn(*args)``; on CUDA as one compiled graph (eager on CPU, inside an outer --compile, or if compiling
    fails: slower, the same numbers)."""
    if not cuda or torch.compiler.is_compiling() or _GRAPHS.get(fn) is False:
        return fn(*args)
    graph = _GRAPHS.get(fn)
    if graph is None:
        graph = _GRAPHS[fn] = torch.compile(fn, dynamic=False)
    try:
        return graph(*args)
    except Exception as err:  # noqa: BLE001 - no triton/compiler here: stay correct, only slower
        warnings.warn(f"fp8: compiled GEMM phase unavailable ({type(err).__name__}: {err}); running it eagerly")
        _GRAPHS[fn] = False
        return fn(*args)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a 16-bit linear would produce here: the autocast dtype if autocast is on, else ``x``'s."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _gather(x8: torch.Tensor, async_op: bool = False):
    """All-gather fp8 sequence shards as bytes (collectives need not know fp8 dtypes). With ``async_op``, a
    handle whose ``wait()`` gives the bytes: view them with ``x8.dtype``."""
    out = mappings.all_gather_along_dim(x8.view(torch.uint8), mappings.SEQ_DIM, async_op=async_op)
    return out if async_op else out.view(x8.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------- the three phases (pure: compiled on CUDA)
def _forward(x, weights, margin: int, sequence_parallel: bool, out_dtype, delayed=None):
    """Outputs of ``x @ w^T`` for each weight, the fp8 input, the scales (weights', then the input's) and, under
    delayed scaling, the weights' new amax records (else None). Current scaling: every operand here is split over
    tp x cp or replicated over it, so the MAX over tp x cp is the whole tensor's amax. ``delayed``: (the
    weights' scales, their amax records), [3] tensors each; the input's scale is the first weight's."""
    n = len(weights)
    amaxes = torch.stack([amax(w) for w in weights] + [amax(x)])
    if delayed is None:
        scales, records = amax_to_scale(reduce_amax(amaxes), E4M3, margin), None
    else:
        meta_scales, seen = delayed
        scales = torch.stack([s[WEIGHT] for s in meta_scales] + [meta_scales[0][INPUT]])
        records = [torch.stack([torch.maximum(r[INPUT], amaxes[n]), torch.maximum(r[WEIGHT], amaxes[i]), r[GRAD]])
                   for i, r in enumerate(seen)]
    x8 = quantize(x, scales[n], E4M3)
    total8 = _gather(x8) if sequence_parallel else x8
    outs = [scaled_mm(_flat(total8), quantize(w, scales[i], E4M3).t(), scales[n], scales[i], out_dtype,
                      fast_accum=True).view(*total8.shape[:-1], w.shape[0]) for i, w in enumerate(weights)]
    return outs, x8, scales, records


def _input_grad(grads, weights, w_scales, margin: int, grad_dtype, tp_split: bool, out_dtype, need_input: bool,
                delayed=None):
    """The output gradients in fp8 with their scales (current scaling: MAX over tp x cp when they are split over
    tp, over cp otherwise), the summed ``g @ W`` (None unless ``need_input``) and the new amax records (delayed
    scaling, as in ``_forward``; else None)."""
    amaxes = torch.stack([amax(g) for g in grads])
    if delayed is None:
        scales, records = amax_to_scale(reduce_amax(amaxes, tp_split), grad_dtype, margin), None
    else:
        meta_scales, seen = delayed
        scales = torch.stack([s[GRAD] for s in meta_scales])
        records = [torch.stack([r[INPUT], r[WEIGHT], torch.maximum(r[GRAD], amaxes[j])]) for j, r in enumerate(seen)]
    g8s = [quantize(g, scales[j], grad_dtype) for j, g in enumerate(grads)]
    grad_input = None
    if need_input:
        for g8, s, w, ws in zip(g8s, scales, weights, w_scales):
            gi = scaled_mm(_flat(g8), quantize(w, ws, E4M3), s, ws, out_dtype)
            grad_input = gi if grad_input is None else grad_input + gi
    return g8s, scales, grad_input, records


def _delayed(metas):
    """A phase's ``delayed`` argument for these linears' states (None: current scaling)."""
    return None if metas is None else ([m.scale for m in metas], [m.amax for m in metas])


def _record(metas, records) -> None:
    """This call's amaxes into the linears' states (in place: outside any compiled graph)."""
    if records is not None:
        torch._foreach_copy_([m.amax for m in metas], records)


def _weight_grads(g8s, g_scales, x8, x_scale, out_dtypes):
    """``g^T x`` per weight, in its ``out_dtypes`` entry (fp32 when it is summed into ``main_grad``)."""
    return [scaled_mm(_flat(g8).t(), _flat(x8), s, x_scale, dt) for g8, s, dt in zip(g8s, g_scales, out_dtypes)]


def _apply_weight_grads(params, g8s, g_scales, x8, x_scale, fuse: bool) -> list:
    """Weight gradients for autograd: summed in fp32 into ``main_grad`` where gradient-accumulation fusion applies
    (autograd gets a placeholder), else in the parameter's dtype."""
    targets = [fusable_main_grad(p, x8.device) if fuse else None for p in params]
    dtypes = [torch.float32 if t is not None else p.dtype for p, t in zip(params, targets)]
    dws = _run(_weight_grads, x8.is_cuda, g8s, g_scales, x8, x_scale, dtypes)
    out = []
    for p, t, dw in zip(params, targets, dws):
        if t is None:
            out.append(dw)
        else:
            t.add_(dw)
            out.append(added_to_main_grad(p))
    return out


def _deferring(params) -> bool:
    """Whether a zero-bubble W-pass capture takes these weights' gradients (see ``layers._defer_weight_grads``)."""
    return bool(params) and weight_grad_store.deferring() and all(p.is_leaf for p in params)


def _defer(params, g8s, g_scales, x8, x_scale, sequence_parallel: bool) -> None:
    """Queue the weight gradients for the W pass."""
    def work():
        total = _gather(x8) if sequence_parallel else x8
        return list(zip(params, _apply_weight_grads(params, g8s, g_scales, total, x_scale, fuse=False)))
    weight_grad_store.defer(work)


# ---------------------------------------------------------------- autograd
class _Fp8ColumnParallelLinears(torch.autograd.Function):
    """Several column-parallel weights reading one input (q/k/v, gate/up), in fp8: one input amax, cast and
    (SP) all-gather for all of them; one backward reduction of the summed input gradient."""

    @staticmethod
    def forward(ctx, x, recipe: Fp8Recipe, sequence_parallel: bool, out_dtype, record: bool, *weights):
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: its GEMMs are skipped
        metas = [w.fp8_meta.follow(w.device) for w in weights] if recipe.delayed else None
        with torch.autocast(x.device.type, enabled=False):  # no fp32 copies for the norms
            outs, x8, scales, records = _run(_forward, x.is_cuda, x, list(weights), recipe.margin,
                                             sequence_parallel, out_dtype, _delayed(metas))
        if record:
            _record(metas, records)
        wgrad = any(ctx.needs_input_grad[5:])
        ctx.save_for_backward(x8 if wgrad else None, scales, *weights)
        ctx.recipe, ctx.sequence_parallel, ctx.out_dtype, ctx.metas = recipe, sequence_parallel, out_dtype, metas
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        with torch.autocast(ctx.x_meta[2].type, enabled=False):  # a backward run under autocast: GEMMs stay fp32
            return _Fp8ColumnParallelLinears._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        x8, scales, *weights = ctx.saved_tensors
        n, sp, recipe = len(weights), ctx.sequence_parallel, ctx.recipe
        shape, dtype, device = ctx.x_meta
        used = [i for i, g in enumerate(grads) if g is not None]
        need_w = [i for i in used if ctx.needs_input_grad[5 + i]]
        if not used:  # no output was used (same on every tp rank): nothing to reduce
            zero = torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
            return (zero, None, None, None, None) + (None,) * n
        params = [weights[i] for i in need_w]
        deferred = _deferring(params)
        gather = _gather(x8, async_op=True) if sp and params and not deferred else None  # under the dgrad GEMMs
        # output grads are split over tp like the weights
        metas = None if ctx.metas is None else [ctx.metas[i] for i in used]
        g8s, g_scales, grad_input, records = _run(_input_grad, device.type == "cuda", [grads[i] for i in used],
                                                  [weights[i] for i in used], [scales[i] for i in used],
                                                  recipe.margin, recipe.grad_dtype, True, ctx.out_dtype,
                                                  ctx.needs_input_grad[0], _delayed(metas))
        _record(metas, records)
        g8 = dict(zip(used, g8s))
        gs = dict(zip(used, g_scales))
        if deferred:
            _defer(params, [g8[i] for i in need_w], [gs[i] for i in need_w], x8, scales[n], sp)
        work = None
        if grad_input is not None:
            grad_input = grad_input.view(*g8s[0].shape[:-1], shape[-1])
            if sp:
                grad_input, work = mappings.reduce_scatter_along_dim(grad_input, mappings.SEQ_DIM, async_op=True)
            else:
                grad_input, work = mappings.all_reduce(grad_input, async_op=True)
        wgrads = [None] * n
        if need_w and not deferred:
            total8 = gather.wait().view(x8.dtype) if gather is not None else x8
            dws = _apply_weight_grads(params, [g8[i] for i in need_w], [gs[i] for i in need_w], total8, scales[n],
                                      fuse=True)
            for i, dw in zip(need_w, dws):
                wgrads[i] = dw
        if work is not None:
            work.wait()
        if grad_input is not None:
            grad_input = grad_input.to(dtype)
        return (grad_input, None, None, None, None, *wgrads)


class _Fp8RowParallelGEMM(torch.autograd.Function):
    """``x @ w^T`` on this rank's input shard in fp8 (the reduction over tp is the caller's). Input and weight are
    both split along the input dim, so both amaxes are MAXed over tp (x cp); the output grad is replicated over tp
    (split over cp: its amax is MAXed over cp alone)."""

    @staticmethod
    def forward(ctx, x, w, recipe: Fp8Recipe, out_dtype, record: bool):
        metas = [w.fp8_meta.follow(w.device)] if recipe.delayed else None
        with torch.autocast(x.device.type, enabled=False):
            (y,), x8, scales, records = _run(_forward, x.is_cuda, x, [w], recipe.margin, False, out_dtype,
                                             _delayed(metas))
        if record:
            _record(metas, records)
        ctx.save_for_backward(x8 if ctx.needs_input_grad[1] else None, scales, w)
        ctx.recipe, ctx.out_dtype, ctx.x_dtype, ctx.metas = recipe, out_dtype, x.dtype, metas
        return y

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            return _Fp8RowParallelGEMM._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x8, scales, w = ctx.saved_tensors
        recipe = ctx.recipe
        (g8,), (g_scale,), grad_input, records = _run(_input_grad, g.is_cuda, [g], [w], [scales[0]], recipe.margin,
                                                      recipe.grad_dtype, False, ctx.out_dtype,
                                                      ctx.needs_input_grad[0], _delayed(ctx.metas))
        _record(ctx.metas, records)
        if grad_input is not None:
            grad_input = grad_input.view(*g.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        grad_weight = None
        if ctx.needs_input_grad[1] and _deferring([w]):
            _defer([w], [g8], [g_scale], x8, scales[1], False)
        elif ctx.needs_input_grad[1]:
            (grad_weight,) = _apply_weight_grads([w], [g8], [g_scale], x8, scales[1], fuse=True)
        return grad_input, grad_weight, None, None, None


def fp8_column_parallel_linears(x: torch.Tensor, weights, biases, sequence_parallel: bool, recipe: Fp8Recipe):
    """``layers.column_parallel_linear_forward`` in fp8 (``sequence_parallel``: tp > 1 already checked). Biases
    are added in the compute dtype."""
    outs = _Fp8ColumnParallelLinears.apply(x, recipe, sequence_parallel, compute_dtype(x), torch.is_grad_enabled(),
                                           *weights)
    return tuple(y if b is None else y + b.to(y.dtype) for y, b in zip(outs, biases))


def fp8_row_parallel_gemm(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """``layers.row_parallel_gemm`` in fp8."""
    return _Fp8RowParallelGEMM.apply(x, weight, recipe, compute_dtype(x), torch.is_grad_enabled())
