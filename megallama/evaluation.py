"""Validation and test evaluation of the training loop (Megatron's ``evaluate`` and
``evaluate_and_print_results``), and the loss mean every rank agrees on."""
from __future__ import annotations

import math
from typing import List

import torch
import torch.distributed as dist

from megallama.initialize import print_rank_0, print_rank_last
from megallama.logging import format_validation_lines
from megallama.mpu import parallel_state as ps


def global_mean_loss(losses: List[dict], device) -> float:
    """Mean of the microbatch losses, on every rank (last pipeline stage holds them, dp ranks average), weighted by
    their ``num tokens`` when they give it: Megatron's sum of losses over sum of tokens, across microbatches,
    ranks and (in evaluation) the --eval-iters batches."""
    val = torch.zeros(2, device=device, dtype=torch.float64)
    if losses:
        weights = [d["num tokens"].double() if "num tokens" in d else torch.ones((), dtype=torch.float64,
                                                                                 device=device) for d in losses]
        val[0] = torch.stack([d["lm loss"].double() * w for d, w in zip(losses, weights)]).sum()
        val[1] = torch.stack(weights).sum()
    if dist.is_initialized():
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(val, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size(True) > 1:
            dist.all_reduce(val, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(val[0] / val[1].clamp_min(1))


def evaluate(args, device, model_chunks, valid_ds, forward_backward, forward_step, consumed_samples: int = 0) -> float:
    """Mean loss over --eval-iters global batches of ``valid_ds``, read after its first ``consumed_samples``."""
    from megallama.data.gpt_dataset import build_data_iterator
    it = build_data_iterator(valid_ds, args.micro_batch_size, consumed_samples, ps.get_data_parallel_rank(),
                             ps.get_data_parallel_world_size(), args.num_workers)
    if hasattr(valid_ds, "wrap_iterator"):  # dataset hook (SFT: global token counts)
        it = valid_ds.wrap_iterator(it, args.num_microbatches)
    for m in model_chunks:
        m.eval()
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            losses += forward_backward(forward_step, it, model_chunks, args.num_microbatches,
                                       args.seq_length // args.context_parallel_size,
                                       args.micro_batch_size, forward_only=True)
    for m in model_chunks:
        m.train()
    return global_mean_loss(losses, device)


def validate(args, device, model_chunks, valid_ds, forward_backward, forward_step, logger, step, consumed, where,
              tag="validation") -> float:
    # Megatron's: each validation reads the next --eval-iters batches (consumed_valid_samples goes on across
    # evaluations and is saved with the checkpoint's args) of a validation set sized for the run; one that is not
    # (a user's dataset) is read from its start each time, so that evaluations stay comparable. The test set is
    # read once, from its start.
    per_eval = args.eval_iters * args.global_batch_size
    continues = tag == "validation" and len(valid_ds) >= args.consumed_valid_samples + per_eval
    read_from = args.consumed_valid_samples if continues else 0
    vloss = evaluate(args, device, model_chunks, valid_ds, forward_backward, forward_step, read_from)
    if tag == "validation":
        args.consumed_valid_samples += per_eval
    ppl = math.exp(min(vloss, 20))  # Megatron's clamp
    print_rank_last(format_validation_lines(where, vloss, ppl))  # Megatron's evaluate_and_print_results
    logger.scalars_with_samples(step, consumed, {f"lm loss {tag}": vloss,
                                                 f"lm loss {tag} ppl": ppl if args.log_validation_ppl_to_tensorboard
                                                 else None})
    return vloss


def evaluate_only(args, device, model_chunks, valid_ds, test_ds, forward_backward, forward_step, logger, iteration,
                   consumed) -> dict:
    """--skip-train (Megatron's): no training step; the loaded checkpoint (or, without --load, the initial model)
    is evaluated on the validation and the test data, and nothing is saved or written to TensorBoard."""
    print_rank_0("skipping training (--skip-train is on) ...")
    valid_losses, test_loss = {}, None
    if valid_ds is not None and args.eval_iters > 0:
        valid_losses[iteration] = validate(args, device, model_chunks, valid_ds, forward_backward, forward_step,
                                            logger, iteration, consumed, f"iteration {iteration} on validation set")
    if test_ds is not None:
        test_loss = validate(args, device, model_chunks, test_ds, forward_backward, forward_step, logger, iteration,
                              consumed, f"iteration {iteration} on test set", "test")
    if not valid_losses and test_loss is None:
        print_rank_0("--skip-train: there is no validation or test data to evaluate (see --split, --valid-data-path, "
                     "--test-data-path, --eval-iters); nothing done")
    logger.close()
    return {"losses": {}, "grad_norms": {}, "iteration_time": {}, "iteration": iteration,
            "valid_losses": valid_losses, "test_loss": test_loss, "consumed_samples": consumed}
