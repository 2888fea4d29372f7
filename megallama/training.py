"""The training loop: schedule -> grad sync -> optimizer step -> LR -> logging -> eval -> checkpoint.

``pretrain(args)`` is what ``pretrain_llama.py`` and the CLI call; the Python API passes its users' data as
``pretrain(args, datasets=(train, valid))``. The loop knows no parallel details beyond
asking ``parallel_state`` and the pipeline/optimizer packages; every layout runs through the same code.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from megallama.checkpointing import check_save_dir, check_writable, load_checkpoint
from megallama.checkpointing.async_save import abandon_async_save
from megallama.checkpointing.run_saver import RunSaver
from megallama.checkpointing.save_load import discard_new_save_dir
from megallama.checkpointing.signals import RunProgress, any_rank, report_interrupt
from megallama.data.cyclic import apply_dataloader_type
from megallama.data.document_masks import apply_document_flags
from megallama.errors import ConfigError
from megallama.evaluation import evaluate_only, global_mean_loss, validate
from megallama.finalize_model_grads import finalize_model_grads
from megallama.initialize import initialize_megatron, is_rank_0, print_rank_0, print_rank_last, warn_rank_0
from megallama.logging import (MEM_FIELD, TrainingLogger, check_wandb_installed, device_peak_flops, flops_per_token,
                               format_log_line, max_over_ranks, memory_report,
                               memory_scalars, moe_scalars)
from megallama.lr_scheduler import OptimizerParamScheduler
from megallama.megatron_profiler import MegatronProfiler
from megallama.model.moe import set_aux_loss_scale
from megallama.model.moe_expert_bias import update_expert_bias
from megallama.model.moe_stats import format_moe_stats, get_moe_stats
from megallama.moe_args import moe_flops_config
from megallama.mpu import parallel_state as ps
from megallama.mpu.context_parallel import cp_mean_loss, get_batch_on_this_cp_rank
from megallama.mpu.fp8_delayed import update_fp8_scales
from megallama.optimizer.compression import compression_report, format_compression_report
from megallama.optimizer.distributed import finish_param_sync
from megallama.profiling import StepProfiler
from megallama.progress_log import ProgressLog
from megallama.progress import ProgressBar
from megallama.run_bounds import check_load_dir, elapsed_text, exit_interval_line, nothing_to_train
from megallama.timers import Timers, timed_iterator
from megallama.training_setup import (build_data, build_test_data, get_forward_backward, given_data,
                                      setup_model_and_optimizer)


def _autocast(args, device):
    if args.bf16 or args.fp16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)
    return nullcontext()


def make_forward_step(args, device):
    def forward_step(data_iterator, model):
        batch = get_batch_on_this_cp_rank(next(data_iterator))  # zig-zag sequence share (identity at cp = 1)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        mask = batch["loss_mask"].to(device, non_blocking=True).float()
        extra = {k: batch[k].to(device, non_blocking=True) for k in ("position_ids", "document_ids") if k in batch}
        with _autocast(args, device):
            output = model(input_ids, labels=labels, loss_mask=mask, **extra)  # masked loss sum, fused head + CE

        def loss_func(loss_sum):
            if "num_loss_tokens" in batch:  # SFT: normalise by the global batch's token count (see sft_dataset)
                scale = batch["num_microbatches"] * ps.get_data_parallel_world_size(with_context_parallel=True)
                tokens = batch["num_loss_tokens"].to(loss_sum).clamp_min(1.0)
                loss, weight = loss_sum * scale / tokens, tokens / scale
            else:  # the whole sequence's mean, as this cp rank's share
                loss, weight = cp_mean_loss(loss_sum, mask, with_count=True)
            # the weight makes the logged means token-weighted, as Megatron's (sum of losses / sum of tokens)
            return loss, {"lm loss": loss.detach(), "num tokens": weight.detach()}
        return output, loss_func
    return forward_step


def _sync_time(device) -> float:
    """Wall time after the queued GPU work: a timer edge must not move training kernels into eval/save time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def pretrain(args, datasets=None) -> dict:
    """Train; returns a summary (losses per iteration, final iteration) for tests and the API. ``datasets``:
    (train, valid) map-style datasets to train on instead of what ``build_data`` makes from the flags.
    Ctrl-C raises ``TrainingInterrupted`` (a KeyboardInterrupt) saying where the run stopped and what is saved."""
    check_save_dir(args)  # before anything is built or written: never train over another run's checkpoints
    check_load_dir(args)
    args.run_start_time = time.time()  # --exit-duration-in-mins counts from here (setup and loading included)
    progress = RunProgress(args.save)
    with report_interrupt(progress):
        try:
            return _pretrain(args, datasets, progress)
        finally:  # a run stopped by an error: its --async-save in flight is dropped unpublished (no-op otherwise)
            abandon_async_save()
            discard_new_save_dir(args.save)  # a refused run leaves no empty --save it made (check_writable)


def _pretrain(args, datasets, progress: RunProgress) -> dict:
    device = initialize_megatron(args)
    if args.save:
        check_writable(args.save)
    if not args.dry_run:
        check_wandb_installed(args)
    tokenizer, train_ds, valid_ds = build_data(args) if datasets is None else (None, *given_data(args, datasets))
    test_ds = build_test_data(args, tokenizer) if tokenizer is not None else None
    train_ds, valid_ds, test_ds = apply_document_flags(args, tokenizer, train_ds, valid_ds, test_ds)
    train_ds = apply_dataloader_type(args, train_ds)
    if args.eval_interval and valid_ds is None:
        print_rank_0(f"warning: --eval-interval {args.eval_interval} but there is no validation data; no evaluation")
    model_chunks, optimizer = setup_model_and_optimizer(args, device)
    if args.dry_run:
        return {"dry_run": True, "losses": {}}
    start_iter, consumed = 0, 0
    args.consumed_valid_samples = 0  # a resume sets it from the checkpoint
    scheduler = OptimizerParamScheduler.from_args(optimizer, args)
    if args.load:
        start_iter, consumed = load_checkpoint(args.load, model_chunks, optimizer, args, finetune=args.finetune,
                                               scheduler=scheduler)
        progress.done = start_iter
        if start_iter:
            print_rank_0(f"resumed from {args.load} at iteration {start_iter} ({consumed} samples consumed)")
        if start_iter and getattr(args, "no_load_optim", False) and not args.finetune:  # no schedule was loaded
            ramp_load = getattr(args, "batch_rampup", None)
            scheduler.start_afresh(consumed / args.global_batch_size if ramp_load else start_iter)
    from megallama.data.gpt_dataset import build_data_iterator
    data_iter = build_data_iterator(train_ds, args.micro_batch_size, consumed, ps.get_data_parallel_rank(),
                                    ps.get_data_parallel_world_size(), args.num_workers)
    if hasattr(train_ds, "wrap_iterator"):  # dataset hook (SFT: global token counts)
        data_iter = train_ds.wrap_iterator(data_iter, args.num_microbatches)
    forward_backward = get_forward_backward(args)
    local_seq = args.seq_length // args.context_parallel_size
    forward_step = make_forward_step(args, device)
    skip_train = getattr(args, "skip_train", False)
    # Megatron's: the last rank writes the events (none with --skip-train); a collective when they are asked for
    logger = TrainingLogger(args, enabled=not skip_train)
    if skip_train:
        return evaluate_only(args, device, model_chunks, valid_ds, test_ds, forward_backward, forward_step, logger,
                             start_iter, consumed)
    timers = Timers.from_args(args, device)
    if timers.log_level >= 2:
        data_iter = timed_iterator(data_iter, timers)
    bar = ProgressBar(args.train_iters, start_iter, enabled=is_rank_0() and not args.no_progress_bar)
    tokens_per_iter = args.global_batch_size * args.seq_length
    moe_cfg = moe_flops_config(args)
    get_moe_stats().reset()  # nothing another run in this process (a test, the API) left in the MoE tally
    flops_tok, peak = flops_per_token(args.model_config, args.seq_length, moe_cfg), device_peak_flops(device)
    report_memory_flag = True  # Megatron's: the memory report at the first logged steps (CUDA)
    if args.log_memory_to_tensorboard and device.type != "cuda":
        warn_rank_0("--log-memory-to-tensorboard writes the CUDA allocator's counters; on CPU there are none, so "
                    "no mem-* tags are written")
    progress_log = ProgressLog(args, consumed, flops_tok, dist.get_rank() if dist.is_initialized() else 0)
    saver = RunSaver(args, model_chunks, optimizer, scheduler, progress, progress_log)  # sync or --async-save
    nothing_to_train(args, start_iter, consumed, saver)
    world = dist.get_world_size() if dist.is_initialized() else 1
    history, grad_norms, times, valid_losses, skipped_in_row = {}, {}, {}, {}, 0
    interval_skipped, interval_nan = 0, 0  # Megatron's counts: per log interval
    interval_loss, interval_steps = 0.0, 0  # the log line's loss: mean over the interval's applied updates
    end_iter = args.train_iters
    if args.exit_interval:  # Megatron's: stop (and save) at the next multiple of it, so a relaunch goes on
        end_iter = min(end_iter, (start_iter // args.exit_interval + 1) * args.exit_interval)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    exit_signal, saved, stopped_early, path = None, None, False, None
    if args.save and getattr(args, "exit_signal_handler", None) is not False:  # on by default with --save
        from megallama.checkpointing.signals import ExitSignalHandler
        exit_signal = ExitSignalHandler()
    profiler = StepProfiler(getattr(args, "profile_step", None), device, enabled=is_rank_0(), printer=print_rank_0)
    mprof = MegatronProfiler(args, device, dist.get_rank() if dist.is_initialized() else 0)  # --profile
    t_last, last_logged = time.time(), start_iter  # interval timer: training time since the last logged step
    ramp = getattr(args, "batch_rampup", None)  # --rampup-batch-size: this iteration's batch from `consumed`
    consumed_at_log = consumed
    per_microbatch = args.micro_batch_size * ps.get_data_parallel_world_size()
    for iteration in range(start_iter, end_iter):
        profiler.begin(iteration + 1)
        mprof.begin(iteration)
        gbs = ramp.global_batch(consumed) if ramp else args.global_batch_size
        num_microbatches = gbs // per_microbatch
        # the schedule's position: the samples consumed before this update (Megatron's count) in global batches,
        # and the update's own share of one (its warmup counts it); at a constant batch, the iteration and 1
        lr = scheduler.step(consumed / args.global_batch_size if ramp else iteration,
                            gbs / args.global_batch_size if ramp else 1.0)
        optimizer.zero_grad()
        for m in model_chunks:
            if hasattr(m, "zero_grad_buffer"):
                m.zero_grad_buffer()
        # MoE aux losses get the gradient scale the schedule gives the LM loss (1/microbatches, x fp16 scale)
        set_aux_loss_scale((float(optimizer.get_loss_scale()) if args.fp16 else 1.0) / num_microbatches)
        if hasattr(data_iter, "num_microbatches"):  # SFT token counts span this iteration's batches only
            data_iter.num_microbatches = num_microbatches
        timers.start("forward-backward")
        losses = forward_backward(forward_step, data_iter, model_chunks, num_microbatches, local_seq,
                                  args.micro_batch_size, forward_only=False,
                                  grad_scale_func=optimizer.scale_loss if args.fp16 else None)
        timers.stop("forward-backward")
        finalize_model_grads(model_chunks, args, timers=timers)
        update_fp8_scales(model_chunks)  # --fp8-recipe delayed: this step's amaxes into the histories, next scales
        timers.start("optimizer")
        ok, grad_norm, num_zeros = optimizer.step()
        timers.stop("optimizer")
        update_expert_bias(model_chunks)  # --moe-router-enable-expert-bias: the step's global loads move the bias
        consumed += gbs
        loss = global_mean_loss(losses, device)
        profiler.end(iteration + 1)
        step = iteration + 1
        if not ok:
            scheduler.skip(gbs / args.global_batch_size)  # a skipped update does not advance it (Megatron's)
        if not ok or not math.isfinite(loss):
            # fp16's dynamic scale backing off from 2^32 (Megatron's) skips ~17 steps by design: not a divergence
            skipped_in_row += not getattr(optimizer, "skipped_for_loss_scale", False) or not math.isfinite(loss)
            interval_skipped, interval_nan = interval_skipped + 1, interval_nan + (not math.isfinite(loss))
            print_rank_last(f"iteration {step}: skipped (non-finite loss or gradient: loss {loss}, grad norm "
                            f"{grad_norm})")
            if skipped_in_row >= args.max_skipped_iters:
                raise ConfigError(f"{skipped_in_row} iterations in a row had non-finite loss or gradients (last at "
                                  f"{step}); lower --lr, use --bf16, or raise --max-skipped-iters")
        else:
            skipped_in_row = 0
            interval_loss, interval_steps = interval_loss + loss, interval_steps + 1
        history[step] = loss
        progress.done = step
        if grad_norm is not None:
            grad_norms[step] = float(grad_norm)  # a host float already (the clip needs it)
        if getattr(args, "loss_log", None) and is_rank_0():  # exact values, for comparing runs bit for bit
            with open(args.loss_log, "a") as f:
                f.write(f"{step} {loss!r}\n")
        log_now = step % args.log_interval == 0 or step == end_iter
        mprof.end(iteration, log_now)
        tb_now = bool((args.tensorboard_dir or args.wandb_project) and step % args.tensorboard_log_interval == 0)
        # a collective: every rank takes it at the same steps (args are the same everywhere)
        params_norm = optimizer.params_norm() if args.log_params_norm and (log_now or tb_now) else None
        if tb_now:
            logger.scalars_with_samples(step, consumed, {
                "learning-rate": lr if args.log_learning_rate_to_tensorboard else None,
                "batch-size": gbs, "lm loss": loss if math.isfinite(loss) else None,
                "loss-scale": float(optimizer.get_loss_scale()) if args.log_loss_scale_to_tensorboard else None,
                "world-size": world if args.log_world_size_to_tensorboard else None,
                "grad-norm": float(grad_norm) if grad_norm is not None and ok else None, "num-zeros": num_zeros,
                "params-norm": params_norm})
            if args.log_memory_to_tensorboard:
                logger.scalars(step, memory_scalars(device))
        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.time()  # per step since the last log: the last line may follow fewer than log_interval
            steps_done = step - last_logged
            dt, t_last, last_logged = (now - t_last) / steps_done, now, step
            times[step] = dt
            # tokens of the interval's steps (each gbs x seq; under a ramp the batches differ)
            tps = (consumed - consumed_at_log) * args.seq_length / (dt * steps_done)
            consumed_at_log = consumed
            mean_loss = interval_loss / interval_steps if interval_steps else None  # all skipped: none, as Megatron
            interval_loss, interval_steps = 0.0, 0
            vals = {"consumed samples": consumed, "elapsed time per iteration (ms)": dt * 1e3, "learning rate": lr,
                    "decoupled learning rate": scheduler.last_decoupled_lr,  # Megatron's, with --decoupled-lr
                    "global batch size": gbs, "lm loss": mean_loss,
                    "loss scale": float(optimizer.get_loss_scale()),  # Megatron's: always (1.0 without fp16)
                    # a skipped update has neither (Megatron's optimizer returns None for both)
                    "grad norm": float(grad_norm) if grad_norm is not None and ok else None,
                    "num zeros": num_zeros if ok else None,
                    "params norm": params_norm,
                    "tokens per second": tps,
                    "MFU": tps * flops_tok / (peak * world) if peak else None,
                    MEM_FIELD: max_over_ranks(  # a collective, at log steps and on CUDA only (None on CPU)
                        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None, device),
                    "throughput per GPU (TFLOP/s/GPU)": tps * flops_tok / world / 1e12 if args.log_throughput else None,
                    "skipped iterations": interval_skipped, "nan iterations": interval_nan}
            interval_skipped, interval_nan = 0, 0
            moe = get_moe_stats().report()  # tokens/expert histogram and aux losses since the last log
            comm = compression_report(model_chunks)  # gradient compression: bytes sent since the last log
            # Megatron's print_rank_last: the last stage has every value (loss, norms, MoE: reduced over all ranks)
            print_rank_last(format_log_line(step, args.train_iters, vals) + (" " + format_moe_stats(moe) if moe else "")
                            + (" " + format_compression_report(comm) if comm else ""))
            if report_memory_flag and (line := memory_report(device, step)) is not None \
                    and ps.get_data_parallel_rank() == 0:  # Megatron's report_memory, after the first steps
                print(line, flush=True)
            report_memory_flag = report_memory_flag and step <= start_iter + 1
            timing, timer_max = timers.log(steps_done)  # a collective: --timing-log-level's phases
            if timing:
                print_rank_last(timing)
            if args.log_timers_to_tensorboard:
                # Megatron's timers.write: seconds per iteration (its printed report is in ms)
                logger.scalars(step, {f"{name}-time": ms / 1e3 for name, ms in timer_max.items()})
            if comm:
                logger.scalars(step, {"comm/grad_bytes_per_step": comm["bytes_per_step"],
                                      "comm/compression_ratio": comm["compression_ratio"]})
            if moe and moe_cfg is not None:
                logger.scalars(step, moe_scalars(moe_cfg, moe))
            logger.scalars(step, {"tokens-per-second": tps, "mfu": vals["MFU"]})
            if args.log_timers_to_tensorboard:
                logger.scalars(step, {"iteration-time": dt, "throughput": tps * flops_tok / world / 1e12})
        bar.update(step, f"loss {loss:.4f}")
        saver.poll(device)  # --async-save: publish the save in flight once every rank has written it
        do_eval = bool(args.eval_interval and valid_ds is not None and step % args.eval_interval == 0)
        out_of_time = getattr(args, "exit_duration_in_mins", None) is not None and any_rank(
            time.time() - args.run_start_time > 60 * args.exit_duration_in_mins, device)
        do_save = bool(args.save and ((args.save_interval and step % args.save_interval == 0) or step == end_iter
                                      or out_of_time))
        t_pause = _sync_time(device) if do_eval or do_save else None  # they stop the interval timer (Megatron's)
        if do_eval:
            valid_losses[step] = validate(args, device, model_chunks, valid_ds, forward_backward, forward_step,
                                           logger, step, consumed, f"iteration {step}")
        if do_save:
            path = saver.save(step, consumed, wait=out_of_time or step == end_iter)
            saved = step
        if t_pause is not None:
            t_last += _sync_time(device) - t_pause
        if out_of_time:
            took = elapsed_text(time.time() - args.run_start_time, args.exit_duration_in_mins)
            print_rank_0(f"--exit-duration-in-mins {args.exit_duration_in_mins:g} reached after {took}"
                         f": stopping at iteration {step}" + (f", checkpoint {path} saved" if do_save else
                                                              " (no --save: nothing saved)"))
            end_iter, stopped_early = step, True
            break
        if exit_signal is not None and exit_signal.should_exit(device):  # SIGTERM: save this iteration, exit
            if saved != step:
                path = saver.save(step, consumed)
            saver.finish()  # --async-save: published before the line says so
            print_rank_0(f"SIGTERM received: checkpoint {path} saved at iteration {step}; exiting")
            end_iter, stopped_early = step, True
            break
    mprof.close()
    saver.finish()  # --async-save: the save in flight is published before the run returns
    if not stopped_early and start_iter < end_iter < args.train_iters:  # --exit-interval stopped it
        print_rank_0(exit_interval_line(args, end_iter, path if saved == end_iter else None))
    finish_param_sync(model_chunks)  # --overlap-param-gather: the last step's all-gathers; final on return
    # a validation corpus is for using; --eval-iters 0 evaluates nothing (Megatron's)
    validates = args.eval_iters > 0 and (args.eval_interval or getattr(args, "valid_data_path", None))
    if not stopped_early and end_iter == args.train_iters > start_iter and validates \
            and valid_ds is not None and end_iter not in valid_losses:  # Megatron's validation at the end
        valid_losses[end_iter] = validate(args, device, model_chunks, valid_ds, forward_backward, forward_step,
                                           logger, end_iter, consumed, f"iteration {end_iter} on validation set")
    test_loss = None
    if test_ds is not None and not stopped_early and end_iter == args.train_iters > start_iter:
        test_loss = validate(args, device, model_chunks, test_ds, forward_backward, forward_step, logger,
                              end_iter, consumed, f"iteration {end_iter} on test set",
                              "test")
    if exit_signal is not None:
        exit_signal.release()
    if getattr(args, "save_adapter", None):
        from megallama.strategies import save_adapter
        save_adapter(args.save_adapter, model_chunks, args)
        print_rank_0(f"saved LoRA adapters to {args.save_adapter}")
    logger.close()
    return {"losses": history, "grad_norms": grad_norms, "iteration_time": times, "iteration": end_iter,
            "valid_losses": valid_losses, "test_loss": test_loss,
            "consumed_samples": consumed,
            "tokens_per_iteration": tokens_per_iter, "flops_per_token": flops_tok,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "num_params": sum(m.num_parameters() if hasattr(m, "num_parameters") else  # ZeRO-3: not the shards
                              sum(p.numel() for p in m.parameters()) for m in model_chunks)}
