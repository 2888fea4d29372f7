"""Where a training run starts and where it stops, said in one line each: a --load that is not there (refused
before anything is built), a checkpoint with nothing left to train (saved into a new --save, as Megatron's end of
training does), and the early stops --exit-interval and --exit-duration-in-mins."""
from __future__ import annotations

import os

from megallama.errors import ConfigError


def check_load_dir(args) -> None:
    """A --load that does not exist is refused, unless it is the --save directory (Megatron's ``--save X --load X``
    first launch: X is made and the run starts from scratch). Megatron warns and starts from random weights; a
    mistyped path would then restart a long run silently, so here it is one line that says how to start afresh."""
    load, save = getattr(args, "load", None), getattr(args, "save", None)
    if not load or os.path.exists(load) or (save and os.path.normpath(load) == os.path.normpath(save)):
        return
    raise ConfigError(f"--load directory {load} does not exist; check the path, or drop --load to train from scratch "
                      "(a first launch of --save X --load X starts from scratch too)")


def nothing_to_train(args, start_iter: int, consumed: int, saver) -> bool:
    """A checkpoint already at --train-iters: say so, and save it into a --save that lacks that iteration (Megatron
    saves the last iteration at the end of training when --save did not get it); an existing one is never
    rewritten. Returns whether there is nothing to train."""
    if not start_iter or start_iter < args.train_iters:
        return False
    from megallama.checkpointing.files import list_iterations
    from megallama.initialize import print_rank_0
    line = f"nothing to train: the checkpoint is at iteration {start_iter}, --train-iters is {args.train_iters}"
    if args.save and start_iter not in list_iterations(args.save):
        path = saver.save(start_iter, consumed, wait=True)
        line += f"; checkpoint {path} saved"
    print_rank_0(line)
    return True


def elapsed_text(seconds: float, limit_minutes: float) -> str:
    """The run's time for the --exit-duration-in-mins line: seconds under a minute, and as many decimals as it takes
    not to read as below the limit (0.6 s is not "0.0 minutes")."""
    value, unit, limit = (seconds, "seconds", 60 * limit_minutes) if seconds < 60 else \
        (seconds / 60, "minutes", limit_minutes)
    digits = next((d for d in range(1, 6) if round(value, d) >= limit), 6)
    return f"{value:.{digits}f} {unit}"


def exit_interval_line(args, step: int, saved_path) -> str:
    """--exit-interval's stop, as --exit-duration-in-mins and SIGTERM say theirs."""
    what = f", checkpoint {saved_path} saved" if saved_path else " (no --save: nothing saved)"
    return f"--exit-interval {args.exit_interval} reached: stopping at iteration {step}{what}"
