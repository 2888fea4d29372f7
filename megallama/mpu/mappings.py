"""Autograd functions that move activations in and out of the tensor-parallel region.

Each is a pair of conjugate collectives (forward op, backward op), as in Megatron:
copy/reduce (identity | all-reduce), scatter/gather along the last dim, and for sequence parallelism
all-gather / reduce-scatter along the sequence dim (dim 1 here: activations are [batch, seq, hidden]).
With tp = 1 every mapping is the identity and touches no process group.
"""
import torch
import torch.distributed as dist

from megallama.mpu import parallel_state as ps

SEQ_DIM = 1


def _tp():
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()


def _all_reduce(x):
    n, g = _tp()
    if n == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=g)
    return x


def _split(x, dim):
    n, _ = _tp()
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[ps.get_tensor_model_parallel_rank()].contiguous()


def _gather(x, dim):
    n, g = _tp()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=g)
    return torch.cat(parts, dim=dim).contiguous()


def _reduce_scatter(x, dim):
    n, g = _tp()
    if n == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    if dist.get_backend(g) == "gloo":  # gloo has no reduce_scatter: all-reduce then keep my chunk
        full = x.contiguous().clone()
        dist.all_reduce(full, group=g)
        return full.chunk(n, dim=dim)[ps.get_tensor_model_parallel_rank()].contiguous()
    dist.reduce_scatter(out, chunks, group=g)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


class _GatherFromSP(torch.autograd.Function):
    """All-gather the sequence; backward reduce-scatters (the input feeds a TP region) or splits."""

    @staticmethod
    def forward(ctx, x, to_model_parallel=True):
        ctx.to_model_parallel = to_model_parallel
        return _gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        if ctx.to_model_parallel:
            return _reduce_scatter(g, SEQ_DIM), None
        return _split(g, SEQ_DIM), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


def copy_to_tensor_model_parallel_region(x):
    return _CopyToTP.apply(x)


def reduce_from_tensor_model_parallel_region(x):
    return _ReduceFromTP.apply(x)


def scatter_to_tensor_model_parallel_region(x):
    return _ScatterToTP.apply(x)


def gather_from_tensor_model_parallel_region(x):
    return _GatherFromTP.apply(x)


def scatter_to_sequence_parallel_region(x):
    return _ScatterToSP.apply(x)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True):
    return _GatherFromSP.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x):
    return _ReduceScatterToSP.apply(x)
