"""Deferred weight gradients: the B/W split of zero-bubble pipeline schedules (ZB-H1, Qi et al. 2024).

A W pass that re-runs ``autograd.backward(out, grad, inputs=params)`` walks the chunk's whole graph again, so it
recomputes every input gradient and W costs B + W. Instead, B runs the whole backward inside ``capture()``: the
parallel linear layers then compute only their input gradient and queue their weight-gradient GEMMs with the two
tensors those read (the layer input and the output gradient). ``apply(pending)`` runs them in W and hands the results
to autograd's own accumulation, so ``param.grad`` and the gradient hooks (DDP's buckets) see them exactly as they
would have seen them in B. Everything else (norms, embeddings, experts, biases) gets its gradient in B.

A layer defers only while a capture is active and only gradients of leaf parameters, so outside a ZB schedule, or
inside a compiled graph (where the check is traced once, as False), nothing changes but where the GEMM runs.
"""
import contextlib
from typing import Callable, Iterable, List, Optional, Tuple

import torch

WeightGrads = Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]]  # -> (leaf parameter, its gradient) pairs

_pending: Optional[List[WeightGrads]] = None


def deferring() -> bool:
    """Whether a layer's backward should queue its weight gradients instead of computing them."""
    return _pending is not None


def defer(weight_grads: WeightGrads) -> None:
    _pending.append(weight_grads)


@contextlib.contextmanager
def capture():
    """Collect the weight-gradient work queued by the backward passes run inside; yields the list it fills.

    A plain module global, not thread-local: CUDA backward functions run on autograd's device threads."""
    global _pending
    prev, _pending = _pending, []
    try:
        yield _pending
    finally:
        _pending = prev


def apply(pending: List[WeightGrads]) -> None:
    """Run queued weight-gradient work and accumulate it through autograd (one engine call; a parameter queued
    more than once gets the sum, so its hooks fire once, as in a single backward)."""
    params, grads, index = [], [], {}
    for work in pending:
        for p, g in work():
            g = g.to(p.dtype)  # what the engine does to a bf16 GEMM's grad for an fp32 parameter
            i = index.setdefault(id(p), len(params))
            if i == len(params):
                params.append(p)
                grads.append(g)
            else:
                grads[i] = grads[i] + g
    pending.clear()
    if params:
        torch.autograd.backward(params, grads)
