"""Warmup then cosine/linear/constant decay, a pure function of the iteration (so resume needs no state).

What a resume does need is the same *settings*: a checkpoint records them and ``load_state_dict`` refuses a run
whose settings differ unless told which to use (Megatron's ``_check_and_set``, with its two flags).
"""
import math
from typing import Optional

from megallama.errors import ConfigError

# setting -> how the message names it (the flag, and where its default comes from)
_LABELS = {"max_lr": "--lr", "min_lr": "--min-lr (default --lr/10)",
           "warmup_iters": "--lr-warmup-iters (default 10% of --train-iters, at most 2000)",
           "decay_iters": "--lr-decay-iters (default --train-iters)", "decay_style": "--lr-decay-style"}


def default_warmup_iters(train_iters: int) -> int:
    return min(2000, train_iters // 10)


def settings_from_args(args: dict) -> Optional[dict]:
    """The scheduler settings a run's arguments (as saved in a checkpoint) resolve to; None when they are not there
    (a converted checkpoint)."""
    if any(args.get(k) is None for k in ("lr", "min_lr", "train_iters")):
        return None
    warmup = args.get("lr_warmup_iters")
    return dict(max_lr=args["lr"], min_lr=args["min_lr"],
                warmup_iters=warmup if warmup is not None else default_warmup_iters(args["train_iters"]),
                decay_iters=max(1, args.get("lr_decay_iters") or args["train_iters"]),
                decay_style=args.get("lr_decay_style", "cosine"))


class OptimizerParamScheduler:
    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str = "cosine"):
        self.optimizer, self.max_lr, self.min_lr = optimizer, max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.decay_style = warmup_iters, max(1, decay_iters), decay_style

    @classmethod
    def from_args(cls, optimizer, args) -> "OptimizerParamScheduler":
        s = settings_from_args(vars(args))
        return cls(optimizer, s["max_lr"], s["min_lr"], s["warmup_iters"], s["decay_iters"], s["decay_style"])

    def get_lr(self, iteration: int) -> float:
        """LR used for the update of iteration ``iteration`` (0-based)."""
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.max_lr * (iteration + 1) / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        progress = min(1.0, (iteration - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters))
        if self.decay_style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, iteration: int) -> float:
        lr = self.get_lr(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return dict(max_lr=self.max_lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                    decay_iters=self.decay_iters, decay_style=self.decay_style)

    def load_state_dict(self, saved: Optional[dict], override: bool = False, use_checkpoint: bool = False) -> None:
        """On resume: ``override`` keeps this run's settings, ``use_checkpoint`` takes the checkpoint's; neither
        and they differ is an error naming every differing setting (a silent change jumps the LR mid-run)."""
        if not saved or override:
            return
        now = self.state_dict()
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if diff and not use_checkpoint:
            what = ", ".join(f"{_LABELS[k]} {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
            raise ConfigError(f"resuming would change the LR schedule ({what}); pass --override-opt-param-scheduler "
                              "to use this run's values or --use-checkpoint-opt-param-scheduler to keep the "
                              "checkpoint's")
        for k, (a, _) in diff.items():
            setattr(self, k, a)
