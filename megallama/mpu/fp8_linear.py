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
"""
from __future__ import annotations

import torch

from megallama.mpu import mappings, weight_grad_store
from megallama.mpu.fp8 import E4M3, Fp8Recipe, amax, amax_to_scale, quantize, scaled_mm, tp_amax
from megallama.mpu.grad_accum_fusion import added_to_main_grad, fusable_main_grad


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


def _weight_grad(param, g8, g_scale, x8, x_scale, fuse: bool) -> torch.Tensor:
    """``g^T x`` from fp8 ``g8`` [tokens, out] and ``x8`` [tokens, in]: summed in fp32 into ``main_grad`` where
    gradient-accumulation fusion applies (a placeholder is returned then), else in the parameter's dtype."""
    target = fusable_main_grad(param, g8.device) if fuse else None
    out_dtype = torch.float32 if target is not None else param.dtype
    dw = scaled_mm(_flat(g8).t(), _flat(x8), g_scale, x_scale, out_dtype)
    if target is None:
        return dw
    target.add_(dw)
    return added_to_main_grad(param)


def _defer(params, g8s, g_scales, x8, x_scale, sequence_parallel: bool) -> bool:
    """Queue the weight gradients for ZB's W pass when a capture is on (see ``layers._defer_weight_grads``)."""
    if not weight_grad_store.deferring() or not all(p.is_leaf for p in params):
        return False

    def work():
        total = _gather(x8) if sequence_parallel else x8
        return [(p, _weight_grad(p, g8, s, total, x_scale, fuse=False)) for p, g8, s in zip(params, g8s, g_scales)]
    weight_grad_store.defer(work)
    return True


class _Fp8ColumnParallelLinears(torch.autograd.Function):
    """Several column-parallel weights reading one input (q/k/v, gate/up), in fp8: one input amax, cast and
    (SP) all-gather for all of them; one backward reduction of the summed input gradient."""

    @staticmethod
    def forward(ctx, x, recipe: Fp8Recipe, sequence_parallel: bool, out_dtype, *weights):
        n = len(weights)
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: its GEMMs are skipped
        with torch.autocast(x.device.type, enabled=False):  # no fp32 copies for the norms
            # weight shards split the output dim; the input is an SP shard or replicated (the MAX is then a no-op)
            amaxes = tp_amax(torch.stack([amax(w) for w in weights] + [amax(x)]))
            scales = amax_to_scale(amaxes, E4M3, recipe.margin)
            x8 = quantize(x, scales[n], E4M3)
            total8 = _gather(x8) if sequence_parallel else x8
            outs = tuple(scaled_mm(_flat(total8), quantize(w, scales[i], E4M3).t(), scales[n], scales[i], out_dtype,
                                   fast_accum=True).view(*total8.shape[:-1], w.shape[0])
                         for i, w in enumerate(weights))
        wgrad = any(ctx.needs_input_grad[4:])
        ctx.save_for_backward(x8 if wgrad else None, scales, *weights)
        ctx.recipe, ctx.sequence_parallel, ctx.out_dtype = recipe, sequence_parallel, out_dtype
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        with torch.autocast(ctx.x_meta[2].type, enabled=False):  # a backward run under autocast: GEMMs stay fp32
            return _Fp8ColumnParallelLinears._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        x8, scales, *weights = ctx.saved_tensors
        n, sp, recipe = len(weights), ctx.sequence_parallel, ctx.recipe
        used = [i for i, g in enumerate(grads) if g is not None]
        need_w = [i for i in used if ctx.needs_input_grad[4 + i]]
        grad_input, work, gather, g8, g_scales = None, None, None, {}, {}
        if used:  # output grads are sharded over tp like the weights
            gs = amax_to_scale(tp_amax(torch.stack([amax(grads[i]) for i in used])), recipe.grad_dtype, recipe.margin)
            for j, i in enumerate(used):
                g_scales[i] = gs[j]
                g8[i] = quantize(grads[i], gs[j], recipe.grad_dtype)
        deferred = bool(need_w) and _defer([weights[i] for i in need_w], [g8[i] for i in need_w],
                                           [g_scales[i] for i in need_w], x8, scales[n], sp)
        if sp and need_w and not deferred:
            gather = _gather(x8, async_op=True)
        if ctx.needs_input_grad[0]:
            shape, dtype, device = ctx.x_meta
            for i in used:
                gi = scaled_mm(_flat(g8[i]), quantize(weights[i], scales[i], E4M3), g_scales[i], scales[i],
                               ctx.out_dtype)
                grad_input = gi if grad_input is None else grad_input.add_(gi)
            if grad_input is None:  # no output was used (same on every tp rank): nothing to reduce
                grad_input = torch.zeros(shape, dtype=dtype, device=device)
            else:
                grad_input = grad_input.view(*g8[used[0]].shape[:-1], shape[-1])
                if sp:
                    grad_input, work = mappings.reduce_scatter_along_dim(grad_input, mappings.SEQ_DIM, async_op=True)
                else:
                    grad_input, work = mappings.all_reduce(grad_input, async_op=True)
        total8 = gather.wait().view(x8.dtype) if gather is not None else x8
        wgrads = [_weight_grad(weights[i], g8[i], g_scales[i], total8, scales[n], fuse=True)
                  if i in need_w and not deferred else None for i in range(n)]
        if work is not None:
            work.wait()
        if grad_input is not None:
            grad_input = grad_input.to(ctx.x_meta[1])
        return (grad_input, None, None, None, *wgrads)


class _Fp8RowParallelGEMM(torch.autograd.Function):
    """``x @ w^T`` on this rank's input shard in fp8 (the reduction over tp is the caller's). Input and weight are
    both split along the input dim, so both amaxes are MAXed over tp; the output grad is the full, replicated one."""

    @staticmethod
    def forward(ctx, x, w, recipe: Fp8Recipe, out_dtype):
        with torch.autocast(x.device.type, enabled=False):
            scales = amax_to_scale(tp_amax(torch.stack([amax(x), amax(w)])), E4M3, recipe.margin)
            x8 = quantize(x, scales[0], E4M3)
            y = scaled_mm(_flat(x8), quantize(w, scales[1], E4M3).t(), scales[0], scales[1], out_dtype,
                          fast_accum=True)
        ctx.save_for_backward(x8 if ctx.needs_input_grad[1] else None, scales, w)
        ctx.recipe, ctx.out_dtype, ctx.x_dtype = recipe, out_dtype, x.dtype
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            return _Fp8RowParallelGEMM._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x8, scales, w = ctx.saved_tensors
        dt = ctx.recipe.grad_dtype
        g_scale = amax_to_scale(amax(g), dt, ctx.recipe.margin)
        g8 = quantize(g, g_scale, dt)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = scaled_mm(_flat(g8), quantize(w, scales[1], E4M3), g_scale, scales[1], ctx.out_dtype)
            grad_input = grad_input.view(*g.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] and not _defer([w], [g8], [g_scale], x8, scales[0], False):
            grad_weight = _weight_grad(w, g8, g_scale, x8, scales[0], fuse=True)
        return grad_input, grad_weight, None, None


def fp8_column_parallel_linears(x: torch.Tensor, weights, biases, sequence_parallel: bool, recipe: Fp8Recipe):
    """``layers.column_parallel_linear_forward`` in fp8 (``sequence_parallel``: tp > 1 already checked). Biases
    are added in the compute dtype."""
    outs = _Fp8ColumnParallelLinears.apply(x, recipe, sequence_parallel, compute_dtype(x), *weights)
    return tuple(y if b is None else y + b.to(y.dtype) for y, b in zip(outs, biases))


def fp8_row_parallel_gemm(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """``layers.row_parallel_gemm`` in fp8."""
    return _Fp8RowParallelGEMM.apply(x, weight, recipe, compute_dtype(x))
