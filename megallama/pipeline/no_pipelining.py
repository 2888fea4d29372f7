"""Forward/backward over microbatches on one stage (pp = 1): the degenerate schedule.

Same contract as every pipeline runner (Megatron's ``forward_backward_func``):
``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)`` with
``loss_func(output_tensor) -> (loss, {"lm loss": detached_loss})``. Each microbatch's loss is divided by the number
of microbatches so the accumulated gradient is the mean over the global batch. Gradient sync is suppressed
(``model.no_sync()`` where the wrapper has one) on all but the last microbatch.

Megatron-core's keywords are taken too, so its ``train_step``/``evaluate`` calls work unchanged:
``collect_non_loss_data=True`` (forward only) keeps ``loss_func(output, non_loss_data=True)`` per microbatch
instead of the loss dicts; ``decoder_seq_length`` is for encoder-decoder models, so it must be None or
``seq_length`` here; ``first_val_step`` (a hint for Transformer Engine's fp8 weight cache) changes nothing.
"""
import contextlib
from typing import Callable, List

import torch

from megallama.errors import ConfigError


def maybe_no_sync(model):
    """The DDP wrapper's ``no_sync`` (accumulate locally, reduce later), or nothing for a bare module."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def check_megatron_keywords(seq_length, decoder_seq_length, collect_non_loss_data: bool, forward_only: bool) -> None:
    """One clear error for what Megatron-core's keywords ask of a decoder-only pipeline that it cannot do."""
    if decoder_seq_length is not None and decoder_seq_length != seq_length:
        raise ConfigError(f"decoder_seq_length {decoder_seq_length} differs from seq_length {seq_length}: it "
                          "applies to encoder-decoder models only; pass None (or seq_length) for a Llama")
    if collect_non_loss_data and not forward_only:
        raise ConfigError("collect_non_loss_data=True runs no backward (its data is not a loss); pass "
                          "forward_only=True, as Megatron's evaluate does")


def forward_backward_no_pipelining(forward_step_func: Callable, data_iterator, model, num_microbatches: int,
                                   seq_length: int = None, micro_batch_size: int = None, forward_only: bool = False,
                                   grad_scale_func: Callable = None, *, decoder_seq_length: int = None,
                                   collect_non_loss_data: bool = False, first_val_step: bool = None) -> List:
    check_megatron_keywords(seq_length, decoder_seq_length, collect_non_loss_data, forward_only)
    if isinstance(model, (list, tuple)):
        assert len(model) == 1, "no-pipelining takes one model chunk"
        model = model[0]
    losses = []

    def step(i):
        output, loss_func = forward_step_func(data_iterator, model)
        if collect_non_loss_data:
            losses.append(loss_func(output, non_loss_data=True))
            return
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
