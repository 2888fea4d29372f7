"""The train DataLoader's batch size as the run's micro-batch per rank, PyTorch's meaning of it (the sequences one
forward pass of one process sees; DDP gives every rank its own loader), and the notes ``launch_training`` prints
where user data would otherwise be read in a way nobody asked for.

Unless the user fixed the micro-batch (TrainingConfig.micro_batch_size, a DistributedConfig's microbatch_size,
--micro-batch-size in extra_args or launch_training's flags; a different value is one error naming both), the
DataLoader's batch replaces the plan's: an auto-configured layout is planned again for it, so the plan and the
estimate ``print_configuration`` shows are those of the run. The global batch is micro x dp x the microbatches the
user asked for (TrainingConfig.batch_size, DistributedConfig.num_microbatches; else one, or the plan's pipeline fill).
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

from megallama.errors import ConfigError


def _flag(argv: List[str], name: str) -> Optional[int]:
    """The last value of ``name`` in argv (``--flag N`` or ``--flag=N``), as argparse keeps it."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return None if value is None else int(value)


def fixed_micro(orch, extra: List[str]) -> Optional[Tuple[str, int]]:
    """(where, value) of a micro-batch the user fixed, the one the flags keep first; None when none is."""
    for where, argv in (("launch_training's micro_batch_size", extra),
                        ("extra_args' --micro-batch-size", orch.extra_args)):
        value = _flag(argv, "--micro-batch-size")
        if value:
            return where, value
    if orch.user_microbatch_size:
        return "DistributedConfig.microbatch_size", orch.user_microbatch_size
    if orch.training_config.micro_batch_size:
        return "TrainingConfig.micro_batch_size", orch.training_config.micro_batch_size
    return None


def follow_dataloader_batch(orch, batch: int, extra: List[str]) -> bool:
    """Make ``batch`` the run's micro-batch per rank (re-planning an auto-configured layout for it); True when
    that changed the orchestrator's configuration."""
    fixed = fixed_micro(orch, extra)
    if fixed:
        where, value = fixed
        if value != batch:
            raise ConfigError(f"the train DataLoader's batch_size {batch} disagrees with {where} {value} (both are "
                              f"the micro-batch per rank); make them equal, or leave {where} unset to train "
                              f"micro-batches of {batch}")
        return False
    dc, tc = orch.distributed_config, orch.training_config
    if dc.microbatch_size == batch:
        return False
    if tc.batch_size and tc.batch_size % batch:
        raise ConfigError(f"TrainingConfig.batch_size {tc.batch_size} (the global batch) is not a multiple of the "
                          f"train DataLoader's batch_size {batch} (the micro-batch per rank); make it a multiple of "
                          f"{batch} x the data-parallel size, or change the DataLoader's batch_size")
    if orch.auto_planned:
        planned = orch._auto_configure(micro_batch_size=batch)
        if orch.plan is None:  # nothing fits at this micro-batch (printed): the data-parallel fallback, as at init
            planned = replace(planned, microbatch_size=batch)
        orch.distributed_config = orch._planned = planned
        return True
    dp = dc.data_parallel_size
    if tc.batch_size and tc.batch_size % (batch * dp):
        raise ConfigError(f"TrainingConfig.batch_size {tc.batch_size} (the global batch) is not a multiple of the "
                          f"train DataLoader's batch_size {batch} x data-parallel size {dp}; make it a multiple of "
                          f"{batch * dp}, or change the DataLoader's batch_size")
    orch.distributed_config = replace(dc, microbatch_size=batch)
    return True


def batch_notes(orch, args, train, before: Optional[int]) -> None:
    """One line on the micro-batch when the DataLoader set it (``before``: the one it replaced) or left it to
    megallama (a loader yielding single sequences, or batches of mixed sizes)."""
    from megallama.initialize import print_rank_0
    shape = (f"global batch {args.global_batch_size} = {args.micro_batch_size} x dp {args.data_parallel_size} x "
             f"{args.num_microbatches} microbatches")
    if before is not None:
        try:
            mem = f", {orch._estimate(args)['memory_per_gpu_gb']:.1f} GiB per GPU estimated"
        except ConfigError:
            mem = ""
        was = "the plan's" if orch.auto_planned else "the configuration's"
        print_rank_0(f"note: micro-batch {args.micro_batch_size} per rank from the train DataLoader's batch_size, "
                     f"not {was} {before}: {shape}{mem} (print_configuration() shows this run)")
    elif train.batch_note:
        print_rank_0(f"{train.batch_note}: {shape}")
    elif train.from_loader and train.batch_size is None:
        print_rank_0(f"note: the train DataLoader does not batch (batch_size=None, single sequences): {shape} "
                     "(set TrainingConfig.micro_batch_size to choose)")


def repeat_notes(args, train, valid, epochs: Optional[float]) -> None:
    """One line where the run reads past the end of the user's data: the sampler then wraps around to its start
    (reshuffled each pass with shuffle=True), which repeats samples nobody asked to see twice."""
    from megallama.initialize import print_rank_0
    n, g = len(train), args.global_batch_size
    read = args.train_iters * g
    if read > n * (epochs or 1):
        asked = f" for the {epochs:g} epoch(s) asked" if epochs else ""
        order = "reshuffled each pass" if getattr(args, "dataloader_type", "single") == "cyclic" else "in order"
        print_rank_0(f"note: {args.train_iters} iterations x global batch {g} read {read} samples of the {n} "
                     f"training samples{asked} ({read / n:.2f} passes): past the end they repeat from the start, "
                     f"{order}")
    if valid is not None and args.eval_iters * g > len(valid):
        print_rank_0(f"note: each evaluation reads eval_iters {args.eval_iters} x global batch {g} = "
                     f"{args.eval_iters * g} samples of the {len(valid)} validation samples, so some count more than "
                     "once; lower TrainingConfig.eval_iters (or the batch) to read each at most once")
