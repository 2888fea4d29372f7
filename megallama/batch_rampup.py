"""Megatron's ``--rampup-batch-size START INCREMENT SAMPLES``: the global batch grows from START by INCREMENT in equal
steps over the first SAMPLES training samples, then stays at --global-batch-size (Llama 3 doubled its batch early in
training for stability). As in Megatron it needs sample-based training (--train-samples): the run's iterations follow
from the ramp, and the LR schedule advances by the samples each update consumed.

The batch of an iteration is a function of the samples consumed before it, so a resume (which restores that count)
and every rank agree on it without any state of their own.
"""
from __future__ import annotations

from megallama.errors import ConfigError


class BatchSizeRampup:
    def __init__(self, start: int, increment: int, ramp_samples: int, global_batch_size: int, per_microbatch: int):
        flag = f"--rampup-batch-size {start} {increment} {ramp_samples}"
        if start < 1 or increment < 1 or ramp_samples < 0:
            raise ConfigError(f"{flag}: the start and increment must be >= 1 and the samples >= 0")
        if start > global_batch_size or (global_batch_size - start) % increment:
            raise ConfigError(f"{flag}: --global-batch-size {global_batch_size} minus the start must be a multiple "
                              "of the increment (and the start at most the global batch)")
        for what, n in (("start", start), ("increment", increment)):
            if n % per_microbatch:
                raise ConfigError(f"{flag}: the {what} {n} is not a multiple of micro-batch x data-parallel size "
                                  f"{per_microbatch}; pick a multiple")
        self.start, self.increment, self.ramp_samples = start, increment, ramp_samples
        self.global_batch_size, self.per_microbatch = global_batch_size, per_microbatch
        steps = (global_batch_size - start) // increment
        self.samples_per_increment = ramp_samples / steps if steps else float("inf")

    def batch_sizes(self) -> list:
        return list(range(self.start, self.global_batch_size + 1, self.increment))

    def global_batch(self, consumed_samples: int) -> int:
        """Megatron's RampupBatchsizeNumMicroBatchesCalculator.update."""
        if consumed_samples > self.ramp_samples:
            return self.global_batch_size
        return self.start + int(consumed_samples / self.samples_per_increment) * self.increment

    def num_microbatches(self, consumed_samples: int) -> int:
        return self.global_batch(consumed_samples) // self.per_microbatch

    def train_iters(self, train_samples: int) -> int:
        """Megatron's update_train_iters: the ramp's iterations one by one, then whole global batches."""
        iters, consumed = 0, 0
        while consumed <= self.ramp_samples and consumed <= train_samples:
            consumed += self.global_batch(consumed)
            iters += 1
        # floor division as Megatron's: a ramp batch that overshot --train-samples is taken back (20 samples, batches
        # 4, 4, 8, 12: three iterations, 16 samples, not four and 28)
        return iters + (train_samples - consumed) // self.global_batch_size


def setup_rampup(args):
    """Parse-time: the ramp (None without the flag), its checks, and --train-iters from --train-samples."""
    values = getattr(args, "rampup_batch_size", None)
    if not values:
        args.batch_rampup = None
        return
    if getattr(args, "train_samples", None) is None:
        raise ConfigError("--rampup-batch-size needs sample-based training: give --train-samples instead of "
                          "--train-iters (as Megatron does)")
    for iters, samples in (("lr_decay_iters", "lr_decay_samples"), ("lr_warmup_iters", "lr_warmup_samples"),
                           ("lr_wsd_decay_iters", "lr_wsd_decay_samples")):
        if getattr(args, iters, None) is not None and getattr(args, samples, None) is None:  # given as iterations
            raise ConfigError(f"--{iters.replace('_', '-')} counts iterations, whose batches a ramp changes; give "
                              f"--{samples.replace('_', '-')} instead (Megatron's sample-based schedule)")
    per = args.micro_batch_size * args.data_parallel_size
    ramp = BatchSizeRampup(*values, args.global_batch_size, per)
    from megallama.pipeline.schedules import check_schedule_args, normalize_schedule_name
    pp, v = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1  # derive_pipeline's
    for gbs in ramp.batch_sizes():
        check_schedule_args(normalize_schedule_name(args.pipeline_schedule), pp, gbs // per, v)
    args.train_iters = ramp.train_iters(args.train_samples)
    # the LR schedule runs in samples (global batches of them): its defaults are the run's samples, not iterations
    full = args.train_samples / args.global_batch_size
    if args.lr_decay_iters is None:
        args.lr_decay_iters = full
    if args.lr_warmup_iters is None and args.lr_warmup_fraction is None:
        from megallama.lr_scheduler import default_warmup_iters
        args.lr_warmup_iters = default_warmup_iters(int(full))
    args.batch_rampup = ramp
