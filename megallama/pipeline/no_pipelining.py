"""Forward/backward over microbatches on one stage (pp = 1): the degenerate schedule.

Same contract as every pipeline runner (Megatron's ``forward_backward_func``):
``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`` with
``loss_func(output_tensor) -> (loss, {"lm loss": detached_loss})``. Each microbatch's loss is divided by the number
of microbatches so the accumulated gradient is the mean over the global batch. Gradient sync is suppressed
(``model.no_sync()`` where the wrapper has one) on all but the last microbatch.
"""
import contextlib
from typing import Callable, List

import torch


def maybe_no_sync(model):
    """The DDP wrapper's ``no_sync`` (accumulate locally, reduce later), or nothing for a bare module."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def forward_backward_no_pipelining(forward_step_func: Callable, data_iterator, model, num_microbatches: int,
                                   seq_length: int = None, micro_batch_size: int = None, forward_only: bool = False,
                                   grad_scale_func: Callable = None) -> List[dict]:
    if isinstance(model, (list, tuple)):
        assert len(model) == 1, "no-pipelining takes one model chunk"
        model = model[0]
    losses = []

    def step(i):
        output, loss_func = forward_step_func(data_iterator, model)
        loss, reduced = loss_func(output)
        if not forward_only:
            loss = loss / num_microbatches
            if grad_scale_func is not None:
                loss = grad_scale_func(loss)
            loss.backward()
        losses.append(reduced)

    with torch.set_grad_enabled(not forward_only):
        ctx = contextlib.nullcontext() if forward_only else maybe_no_sync(model)
        with ctx:
            for i in range(num_microbatches - 1):
                step(i)
        step(num_microbatches - 1)
    return losses
