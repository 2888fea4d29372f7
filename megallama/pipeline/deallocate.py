"""Megatron's --deallocate-pipeline-outputs, which the pipeline runner always does.

Once a stage has handed a microbatch's output to the send, the output is only needed for its autograd graph:
``deallocate_output`` swaps its data for a 1-element stand-in, so the storage lives only as long as the send
buffer (the runner lets go of that when the transfer is over) instead of until the backward, one [b, s, h]
hidden state fewer per microbatch in flight. ``backward_from`` then runs the backward without the shape check
that ``torch.autograd.backward`` would fail on (Megatron's ``custom_backward``). Megatron leaves the flag off by
default for historical reasons; nothing here reads a sent output's data again, so there is no reason to.
"""
from __future__ import annotations

from typing import Optional

import torch


def deallocate_output(out: torch.Tensor) -> bool:
    """Megatron's ``deallocate_output_tensor``: ``out`` keeps its autograd graph and a 1-element stand-in for its
    data. Only for an output computed here (a leaf, e.g. a chunk passing its input through, has no graph to keep)
    and not a view, whose storage its base holds anyway (Megatron asserts that). Returns whether it freed."""
    if out.grad_fn is None or out._base is not None:
        return False
    out.data = torch.empty((1,), device=out.device, dtype=out.dtype)
    return True


def backward_from(out: torch.Tensor, grad: Optional[torch.Tensor], inputs=None, retain_graph: bool = False) -> None:
    """``torch.autograd.backward(out, grad, inputs=..., retain_graph=...)`` minus its check that ``grad`` has
    ``out``'s shape, which a deallocated output no longer has (Megatron's ``custom_backward``): the engine checks
    ``grad`` against the shape the graph recorded. ``grad`` None: a scalar loss, which is never freed. A hidden
    state needing no grad has no backward: the first stage holding only LoRA's frozen embedding trains nothing."""
    if grad is not None and not out.requires_grad:
        return
    if grad is None:
        torch.autograd.backward(out, inputs=inputs, retain_graph=retain_graph)
        return
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)  # keeps compile's context for its threads
    args = ((out,), (grad,), retain_graph, False, tuple(inputs or ()))
    if run is not None:
        run(*args, allow_unreachable=True, accumulate_grad=True)
    else:  # pragma: no cover - older torch
        torch.autograd.Variable._execution_engine.run_backward(*args, allow_unreachable=True, accumulate_grad=True)
