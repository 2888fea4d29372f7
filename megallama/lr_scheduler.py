"""Warmup then cosine/linear/constant decay, a pure function of the iteration (so resume needs no state)."""
import math


class OptimizerParamScheduler:
    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str = "cosine"):
        self.optimizer, self.max_lr, self.min_lr = optimizer, max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.decay_style = warmup_iters, max(1, decay_iters), decay_style

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
