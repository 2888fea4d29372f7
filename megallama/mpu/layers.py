"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Weights are stored as the local shard; each parameter carries ``tensor_model_parallel``, ``partition_dim`` so
that initialisation (``megallama.mpu.random.init_parameter``), checkpoint resharding and HF conversion can
rebuild the full tensor. With ``sequence_parallel`` the column layer all-gathers its [b, s/tp, h] input and the
row layer reduce-scatters its output back to sequence shards.

A layer reads the tp size once, when built (its shard shapes depend on it), and refuses to run under another one:
build layers after ``initialize_model_parallel``. Constructors initialise the weight with N(0, init_std) as
Megatron's do (``perform_initialization=False`` skips it; a meta-device weight is never touched, so
``build_model``'s meta build followed by ``init_weights`` costs nothing extra).
"""
import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu import mappings, weight_grad_store
from megallama.mpu.fp8_linear import fp8_column_parallel_linears, fp8_row_parallel_gemm
from megallama.mpu.grad_accum_fusion import accumulate_weight_grad, main_grad_target
from megallama.mpu.random import get_cuda_rng_tracker


def set_tensor_model_parallel_attributes(param: nn.Parameter, is_parallel: bool, dim: int) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ConfigError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}; "
                          "choose --tensor-model-parallel-size dividing it")
    return numerator // denominator


def check_tensor_model_parallel_size(layer: nn.Module) -> None:
    """A layer built under one tp size has that size's shard shapes: run under another, its forward would add
    (or skip) the tp collectives around full-size weights and give silently wrong gradients."""
    tp = ps.get_tensor_model_parallel_world_size()
    built = getattr(layer, "tensor_model_parallel_size", tp)
    if built != tp:
        raise ConfigError(f"{type(layer).__name__} was built with tensor-model-parallel size {built} but used with "
                          f"{tp}: build layers after initialize_model_parallel")


@torch.no_grad()
def initialize_affine_weight(weight: torch.Tensor, std: float, partition_dim: int) -> None:
    """Fill this rank's shard of a weight with N(0, std), Megatron's constructor init.

    On CPU (Megatron's ``use_cpu_initialization`` path) the full fp32 master weight is drawn from the default
    generator and sliced, so every tp gives the same full weight for the same seed. Elsewhere only the local shard
    is drawn, under the tp-rank-specific "model-parallel-rng" stream when ``model_parallel_cuda_manual_seed`` set
    one (Megatron's GPU path). A meta weight is left alone: nothing to fill, nothing to pay."""
    if weight.is_meta:
        return
    tp = ps.get_tensor_model_parallel_world_size()
    if weight.device.type == "cpu":
        if tp == 1 and weight.dtype == torch.float32:
            weight.normal_(0.0, std)  # the master weight itself: same values, no copy
            return
        shape = list(weight.shape)
        shape[partition_dim] *= tp
        master = torch.empty(shape, dtype=torch.float32).normal_(0.0, std)
        weight.copy_(master.chunk(tp, partition_dim)[ps.get_tensor_model_parallel_rank()])
        return
    tracker = get_cuda_rng_tracker()
    fork = tracker.fork() if "model-parallel-rng" in tracker.states else contextlib.nullcontext()
    with fork:
        weight.normal_(0.0, std)


def autocast_copies(x: torch.Tensor, *tensors):
    """``x`` and ``tensors`` (None stays None) cast to the active autocast dtype, else as given. The parallel GEMM
    Functions take these copies, made outside them as autocast makes a linear's: a copy's grad then goes back
    through its cast node after the Function has freed what it saved, so the fp32 grad never coexists with the
    saved bf16 copy."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dt = torch.get_autocast_dtype(dev)
    return (x.to(dt), *(t if t is None else t.to(dt) for t in tensors))


def _wgrad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


def _weight_grad(leaf, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g^T x``, summed straight into ``leaf.main_grad`` where gradient-accumulation fusion applies (a
    placeholder is returned then: see grad_accum_fusion)."""
    target = main_grad_target(leaf, g, x)
    return _wgrad(g, x) if target is None else accumulate_weight_grad(leaf, target, g, x)


def _defer_weight_grads(params, grads, x: torch.Tensor, sequence_parallel: bool) -> bool:
    """Queue ``dW_i = g_i^T x`` for a zero-bubble schedule's W pass (see weight_grad_store) when a capture is on
    and every weight is a leaf parameter; False: the caller computes them now. ``x`` is the input as saved (the
    sequence shard under SP, gathered again in W)."""
    if not weight_grad_store.deferring() or any(p is None for p in params):
        return False

    def work():
        total = mappings.all_gather_along_dim(x, mappings.SEQ_DIM) if sequence_parallel else x
        return [(p, _wgrad(g, total)) for p, g in zip(params, grads)]
    weight_grad_store.defer(work)
    return True


class _ColumnParallelLinears(torch.autograd.Function):
    """Enter the TP region once for several column-parallel weights that read the same input (q/k/v, gate/up).

    Forward: all-gather the [b, s/tp, h] input (sequence parallel) or take the replicated input as is, then one
    GEMM per weight. Only the input as given (the sequence shard under SP) is saved; backward re-gathers it, as
    Megatron does, so SP keeps its activation-memory saving. Backward sums the input grads of all weights and
    overlaps their reduce-scatter (SP) / all-reduce (TP) with the weight-gradient GEMMs.
    Under autocast ``column_parallel_linear_forward`` passes the input, weights and biases as ``autocast_copies``.
    Inside ``weight_grad_store.capture()`` (ZB's B pass) the weight-gradient GEMMs are queued for the W pass.
    """

    @staticmethod
    def forward(ctx, x, sequence_parallel, n, leaves, *params):
        weights, biases = params[:n], params[n:]
        # ``leaves``: the parameters behind ``weights`` (their autocast copies, made outside); not autograd inputs,
        # only where a deferred grad accumulates
        ctx.leaf_weights = tuple(w if w.is_leaf else None for w in leaves)
        ctx.own_leaf = tuple(w is leaf for w, leaf in zip(weights, leaves))  # no autocast copy in between
        ctx.sequence_parallel, ctx.n = sequence_parallel, n
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: its GEMMs are skipped
        ctx.has_bias = tuple(b is not None for b in biases)
        # the input serves only the weight gradients: frozen weights (LoRA's base) must not keep it alive
        wgrad = any(ctx.needs_input_grad[4:4 + n])
        ctx.save_for_backward(x if wgrad else None, *weights)
        ctx.x_meta = (x.shape, x.dtype, x.device)
        total = mappings.all_gather_along_dim(x, mappings.SEQ_DIM) if sequence_parallel else x
        with torch.autocast(x.device.type, enabled=False):
            return tuple(F.linear(total, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        sp, n = ctx.sequence_parallel, ctx.n
        need_w = [g is not None and ctx.needs_input_grad[4 + i] for i, g in enumerate(grads)]
        wanted = [i for i in range(n) if need_w[i]]
        deferred = bool(wanted) and _defer_weight_grads([ctx.leaf_weights[i] for i in wanted],
                                                        [grads[i] for i in wanted], x, sp)
        gather = None
        if sp and wanted and not deferred:
            gather = mappings.all_gather_along_dim(x, mappings.SEQ_DIM, async_op=True)
        grad_input, work = None, None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grads, weights):
                if g is not None:
                    gi = g.matmul(w)
                    grad_input = gi if grad_input is None else grad_input.add_(gi)
            if grad_input is None:  # no output was used (same on every tp rank): nothing to reduce
                shape, dtype, device = ctx.x_meta
                grad_input = torch.zeros(shape, dtype=dtype, device=device)
            elif sp:
                grad_input, work = mappings.reduce_scatter_along_dim(grad_input, mappings.SEQ_DIM, async_op=True)
            else:
                grad_input, work = mappings.all_reduce(grad_input, async_op=True)
        total = gather.wait() if gather is not None else x
        wgrads = [_weight_grad(ctx.leaf_weights[i] if ctx.own_leaf[i] else None, g, total)
                  if need_w[i] and not deferred else None for i, g in enumerate(grads)]
        bgrads = []
        for i, g in enumerate(grads):
            has_b = ctx.has_bias[i] and g is not None and ctx.needs_input_grad[4 + n + i]
            bgrads.append(g.reshape(-1, g.shape[-1]).sum(0) if has_b else None)
        if work is not None:
            work.wait()
        return (grad_input, None, None, None, *wgrads, *bgrads)


class _RowParallelGEMM(torch.autograd.Function):
    """``F.linear(x, w)`` on this rank's input shard (the reduction over tp is the caller's), with the weight
    gradient deferrable to ZB's W pass like ``_ColumnParallelLinears``. ``w`` is the leaf ``param`` or its
    ``autocast_copies`` copy."""

    @staticmethod
    def forward(ctx, x, w, param_holder):
        (param,) = param_holder  # in a tuple: not an autograd input, only where a deferred grad accumulates
        ctx.leaf_weight = param if param.is_leaf else None
        ctx.own_leaf = w is param
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)  # x only serves the weight gradient
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        grad_input = g.matmul(w) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1] and not _defer_weight_grads([ctx.leaf_weight], [g], x, False):
            grad_weight = _weight_grad(ctx.leaf_weight if ctx.own_leaf else None, g, x)
        return grad_input, grad_weight, None


def row_parallel_gemm(x: torch.Tensor, weight: torch.Tensor, fp8=None) -> torch.Tensor:
    """``F.linear(x, weight)`` without the reduction over tp, casting both to the autocast dtype if one is active
    (``fp8``: an ``Fp8Recipe``, the GEMMs in fp8 instead, see mpu.fp8_linear)."""
    if fp8 is not None:
        return fp8_row_parallel_gemm(x, weight, fp8)
    x, w = autocast_copies(x, weight)
    return _RowParallelGEMM.apply(x, w, (weight,))


def column_parallel_linear_forward(x: torch.Tensor, weights, biases=None, sequence_parallel: bool = False,
                                   fp8=None):
    """``tuple(linear(enter_tp_region(x), w_i, b_i))`` with one input collective and one grad reduction in all.

    ``x`` is the replicated input, or this rank's [b, s/tp, h] sequence shard when ``sequence_parallel``.
    ``fp8``: an ``Fp8Recipe``, the GEMMs in fp8 (mpu.fp8_linear)."""
    weights = tuple(weights)
    biases = tuple(biases) if biases is not None else (None,) * len(weights)
    sp = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
    if fp8 is not None:
        return fp8_column_parallel_linears(x, weights, biases, sp, fp8)
    x, *copies = autocast_copies(x, *weights, *biases)
    return _ColumnParallelLinears.apply(x, sp, len(weights), weights, *copies)  # weights: the leaves behind copies


def column_parallel_linears(x: torch.Tensor, layers) -> tuple:
    """Outputs of several ``ColumnParallelLinear``s reading the same input (q/k/v, gate/up), sharing one
    all-gather (SP) and one backward reduction instead of one per layer.

    A layer carrying an unmerged adapter (``adapter_forward(x)`` / ``base_weight``, as LoRA's layers do) runs its
    base weight in the shared GEMM and adds ``adapter_forward(x)`` on the same input layout."""
    for layer in layers:
        check_tensor_model_parallel_size(layer)
    sp, fp8 = layers[0].sequence_parallel, layers[0].fp8
    if any(layer.sequence_parallel != sp or layer.gather_output or layer.fp8 != fp8 for layer in layers):
        raise ValueError("column_parallel_linears needs layers with the same sequence_parallel and fp8 recipe, and "
                         "no gather_output")
    adapters = [None if getattr(layer, "merged", True) else getattr(layer, "adapter_forward", None)
                for layer in layers]
    weights = [layer.weight if a is None else layer.base_weight for layer, a in zip(layers, adapters)]
    if any(a is not None for a in adapters):  # one autocast copy of x for the GEMMs and every adapter
        (x,) = autocast_copies(x)
    outs = column_parallel_linear_forward(x, weights, [layer.bias for layer in layers], sp, fp8)
    return tuple(y if a is None else y + a(x).to(y.dtype) for y, a in zip(outs, adapters))


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by columns (output features) over tp ranks.

    Under sequence parallelism the input is this rank's [b, s/tp, h] shard and is all-gathered here; several
    layers reading the same input should go through ``column_parallel_linears`` to share that collective.
    Returns the output tensor, bias added, as nn.Linear does: not Megatron-core's ``(output, output_bias)`` pair,
    which ``out, _ = layer(x)`` would silently split along the batch here."""

    fp8 = None  # an ``Fp8Recipe`` runs the GEMMs in fp8 (set by ``mpu.fp8.enable_fp8`` on decoder layers)

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 sequence_parallel: bool = False, init_std: float = 0.02, device=None, dtype=None,
                 perform_initialization: bool = True):
        super().__init__()
        tp = self.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, tp, "output size")
        self.gather_output, self.sequence_parallel, self.init_std = gather_output, sequence_parallel, init_std
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, 0)
        self.weight.init_std = init_std
        if perform_initialization:
            initialize_affine_weight(self.weight, init_std, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, device=device, dtype=dtype))
            set_tensor_model_parallel_attributes(self.bias, tp > 1, 0)
            self.bias.init_std = 0.0
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weight`` overrides the own weight (a tied output layer passes the embedding table)."""
        check_tensor_model_parallel_size(self)
        w = self.weight if weight is None else weight
        (y,) = column_parallel_linear_forward(x, (w,), (self.bias,), self.sequence_parallel, self.fp8)
        if self.gather_output:
            y = mappings.gather_from_tensor_model_parallel_region(y)
        return y

    def extra_repr(self):
        return f"in={self.input_size}, out={self.output_size} (local {self.output_size_per_partition})"


class RowParallelLinear(nn.Module):
    """Y = X A with A split by rows (input features); partial outputs are summed over tp. Returns the output tensor
    (bias added), not Megatron-core's ``(output, output_bias)``: see ``ColumnParallelLinear``."""

    fp8 = None  # as ColumnParallelLinear's

    def __init__(self, input_size: int, output_size: int, bias: bool = False, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, init_std: float = 0.02, device=None, dtype=None,
                 perform_initialization: bool = True):
        super().__init__()
        tp = self.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, tp, "input size")
        self.input_is_parallel, self.sequence_parallel, self.init_std = input_is_parallel, sequence_parallel, init_std
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, 1)
        self.weight.init_std = init_std
        if perform_initialization:
            initialize_affine_weight(self.weight, init_std, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, device=device, dtype=dtype))
            self.bias.init_std = 0.0
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor_model_parallel_size(self)
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        y = row_parallel_gemm(x, self.weight, self.fp8)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y, inplace=True)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self):
        return f"in={self.input_size} (local {self.input_size_per_partition}), out={self.output_size}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; out-of-shard tokens give zeros, then all-reduce over tp."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02, sequence_parallel=False,
                 device=None, dtype=None, perform_initialization: bool = True):
        super().__init__()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.tensor_model_parallel_size = tp
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_partition = divide(num_embeddings, tp, "vocabulary size")
        self.vocab_start = rank * self.per_partition
        self.vocab_end = self.vocab_start + self.per_partition
        self.sequence_parallel, self.init_std = sequence_parallel, init_std
        self.weight = nn.Parameter(torch.empty(self.per_partition, embedding_dim, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, 0)
        self.weight.init_std = init_std
        if perform_initialization:
            initialize_affine_weight(self.weight, init_std, 0)
        # tied to the output layer, its .grad sums the lookup's gradient and the head GEMM's: a fused head GEMM's
        # placeholder would hide the lookup's part (grad_accum_fusion)
        self.weight.allow_grad_accum_fusion = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_tensor_model_parallel_size(self)
        if self.tensor_model_parallel_size == 1:
            out = F.embedding(input_ids, self.weight)
            return mappings.scatter_to_sequence_parallel_region(out) if self.sequence_parallel else out
        mask = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(mask, 0)
        out = F.embedding(local, self.weight).masked_fill(mask.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out)
        return mappings.reduce_from_tensor_model_parallel_region(out, inplace=True)
