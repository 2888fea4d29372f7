"""Warmup then cosine/linear/constant/inverse-square-root/WSD decay, a function of the number of *applied* updates;
and Megatron's weight-decay schedule (--weight-decay-incr-style constant|linear|cosine from --start-weight-decay to
--end-weight-decay over --train-iters), applied to the groups that decay (``wd_mult``).

An iteration whose update was skipped (fp16 overflow, non-finite gradients) does not advance the schedule, as in
Megatron (its scheduler steps only when ``update_successful``); the count of such iterations is the only state,
saved with the checkpoint. A resume also needs the same *settings*: a checkpoint records them and
``load_state_dict`` refuses a run whose settings differ unless told which to use (Megatron's ``_check_and_set``,
with its two flags).

Megatron's ``--decoupled-lr``/``--decoupled-min-lr``: the input embedding and the output layer (parameters marked
``is_embedding_or_output_parameter``, both copies of a tied pair under pipeline parallelism) sit in optimizer groups
marked ``is_decoupled_lr`` that follow the same schedule (warmup from ``--lr-warmup-init``, decay style, iterations)
between their own peak and floor; the floor defaults to ``--min-lr``. They are schedule settings like the others:
a resume that changes them needs one of the two flags.
"""
import math
from typing import Optional

from megallama.errors import ConfigError

# setting -> how the message names it (the flag, and where its default comes from)
_LABELS = {"max_lr": "--lr", "min_lr": "--min-lr (default --lr/10)", "init_lr": "--lr-warmup-init",
           "warmup_iters": "--lr-warmup-iters (default 10% of --train-iters, at most 2000)",
           "decay_iters": "--lr-decay-iters (default --train-iters, or --train-samples in global batches)",
           "decay_style": "--lr-decay-style",
           "wsd_decay_iters": "--lr-wsd-decay-iters", "wsd_decay_style": "--lr-wsd-decay-style",
           "start_wd": "--start-weight-decay (default --weight-decay)",
           "end_wd": "--end-weight-decay (default --weight-decay)",
           "wd_incr_iters": "--train-iters (or --train-samples in global batches)",
           "wd_incr_style": "--weight-decay-incr-style", "decoupled_lr": "--decoupled-lr",
           "decoupled_min_lr": "--decoupled-min-lr (default --min-lr)"}
DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
# settings added after the first checkpoints: an older checkpoint without them had these values
_DEFAULTS = {"init_lr": 0.0, "wsd_decay_iters": None, "wsd_decay_style": "exponential", "start_wd": None,
             "end_wd": None, "wd_incr_iters": None, "wd_incr_style": "constant", "decoupled_lr": None,
             "decoupled_min_lr": None}
WD_INCR_STYLES = ("constant", "linear", "cosine")


def _shown(a, b) -> tuple:
    """Two differing settings as the message prints them: floats as :g (3e-4's --lr/10 is 0.00030000000000000003),
    unless that would print both alike."""
    g = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return (g(a), g(b)) if g(a) != g(b) else (str(a), str(b))


def default_warmup_iters(train_iters: int) -> int:
    return min(2000, train_iters // 10)


def settings_from_args(args: dict) -> Optional[dict]:
    """The scheduler settings a run's arguments (as saved in a checkpoint) resolve to; None when they are not there
    (a converted checkpoint)."""
    if any(args.get(k) is None for k in ("lr", "min_lr", "train_iters")):
        return None
    decay = max(1, args.get("lr_decay_iters") or _run_span(args))  # Megatron's default: all the run's samples
    warmup, fraction = args.get("lr_warmup_iters"), args.get("lr_warmup_fraction")
    if warmup is None:  # Megatron's --lr-warmup-fraction is a fraction of the decay iterations
        warmup = fraction * decay if fraction is not None else default_warmup_iters(args["train_iters"])
    style = args.get("weight_decay_incr_style") or "constant"  # constant: the optimizer keeps --weight-decay
    decoupled = args.get("decoupled_lr")
    varied = style != "constant"
    return dict(max_lr=args["lr"], min_lr=args["min_lr"], init_lr=args.get("lr_warmup_init") or 0.0,
                warmup_iters=warmup, decay_iters=decay, decay_style=args.get("lr_decay_style", "cosine"),
                wsd_decay_iters=args.get("lr_wsd_decay_iters"),
                wsd_decay_style=args.get("lr_wsd_decay_style") or "exponential",
                # constant: --weight-decay, recorded (Megatron's start = end = weight_decay) so a resume compares it
                start_wd=args.get("start_weight_decay") if varied else args.get("weight_decay"),
                end_wd=args.get("end_weight_decay") if varied else args.get("weight_decay"),
                wd_incr_iters=_run_span(args) if varied else None, wd_incr_style=style,
                decoupled_lr=decoupled, decoupled_min_lr=_decoupled_min_lr(args) if decoupled is not None else None)


def _decoupled_min_lr(args: dict) -> float:
    """Megatron's: --decoupled-min-lr, else --min-lr."""
    return args["min_lr"] if args.get("decoupled_min_lr") is None else args["decoupled_min_lr"]


def _run_span(args: dict) -> float:
    """The run's length in the schedule's unit: iterations, or with --train-samples (Megatron's sample-based
    schedule, which does not round down to whole iterations; under --rampup-batch-size iterations are not global
    batches) the samples in global batches."""
    if args.get("train_samples"):
        return args["train_samples"] / args["global_batch_size"]
    return args["train_iters"]


def check_schedule_flags(args) -> None:
    """One error line per contradiction, before anything is built (Megatron asserts most of these)."""
    if getattr(args, "lr_warmup_fraction", None) is not None:
        if args.lr_warmup_iters == 0:  # Megatron's default value: the fraction sets the warmup
            args.lr_warmup_iters = None
        if args.lr_warmup_iters is not None:
            raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters both set the warmup; pass one")
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ConfigError(f"--lr-warmup-fraction {args.lr_warmup_fraction} is not in [0, 1]")
    style = getattr(args, "weight_decay_incr_style", "constant")
    start, end = getattr(args, "start_weight_decay", None), getattr(args, "end_weight_decay", None)
    if style == "constant" and (start is not None or end is not None):  # Megatron asserts the same
        raise ConfigError("--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear or cosine "
                          "(constant uses --weight-decay)")
    if style != "constant" and (start is None or end is None):
        raise ConfigError(f"--weight-decay-incr-style {style} needs --start-weight-decay and --end-weight-decay")
    if style != "constant" and min(start, end) < 0:
        raise ConfigError(f"weight decay must be >= 0, got --start-weight-decay {start} --end-weight-decay {end}")
    wsd_iters = getattr(args, "lr_wsd_decay_iters", None)
    if args.lr_decay_style == "WSD" and wsd_iters is None:
        raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (how many of the last iterations anneal)")
    if wsd_iters is not None and args.lr_decay_style != "WSD":
        raise ConfigError(f"--lr-wsd-decay-iters applies to --lr-decay-style WSD, not {args.lr_decay_style}")
    if wsd_iters is not None and wsd_iters < 1:
        raise ConfigError(f"--lr-wsd-decay-iters must be >= 1, got {wsd_iters}")


class OptimizerParamScheduler:
    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str = "cosine", init_lr: float = 0.0, wsd_decay_iters: Optional[int] = None,
                 wsd_decay_style: str = "exponential", start_wd: Optional[float] = None,
                 end_wd: Optional[float] = None, wd_incr_iters: Optional[int] = None, wd_incr_style: str = "constant",
                 decoupled_lr: Optional[float] = None, decoupled_min_lr: Optional[float] = None,
                 global_batch_size: int = 1):
        if decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {decay_style} is not one of {', '.join(DECAY_STYLES)}")
        if wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(f"--lr-wsd-decay-style {wsd_decay_style} is not one of {', '.join(WSD_DECAY_STYLES)}")
        self.optimizer, self.max_lr, self.min_lr, self.init_lr = optimizer, max_lr, min_lr, init_lr
        self.warmup_iters, self.decay_iters, self.decay_style = warmup_iters, max(1, decay_iters), decay_style
        self.wsd_decay_iters, self.wsd_decay_style = wsd_decay_iters, wsd_decay_style
        self.start_wd, self.end_wd, self.wd_incr_iters, self.wd_incr_style = start_wd, end_wd, wd_incr_iters, \
            wd_incr_style
        if wd_incr_style != "constant" and (start_wd is None or end_wd is None or not wd_incr_iters):
            raise ConfigError(f"--weight-decay-incr-style {wd_incr_style} needs --start-weight-decay and "
                              "--end-weight-decay")
        # the embedding/output groups' peak and floor (None: the optimizer has no such groups)
        self.decoupled_lr = decoupled_lr
        self.decoupled_min_lr = min_lr if decoupled_min_lr is None and decoupled_lr is not None else decoupled_min_lr
        self.last_decoupled_lr = None  # what step() gave those groups last (the log line's "decoupled learning rate")
        self.skipped_iters = 0  # iterations whose update was skipped: they do not advance the schedule
        self.global_batch_size = global_batch_size  # inverse-square-root's floor of one sample (not a setting)
        self._checkpoint_wd = None  # a constant weight decay taken from the checkpoint (--use-checkpoint-...)
        if decay_style != "constant" and warmup_iters > self.decay_iters:  # Megatron asserts warmup < decay
            raise ConfigError(f"the LR warmup ({warmup_iters:g} iterations) is longer than the decay "
                              f"({self.decay_iters:g}, --lr-decay-iters or --train-iters); shorten --lr-warmup-iters "
                              "or lengthen --lr-decay-iters")
        if decay_style == "WSD":
            if wsd_decay_iters is None:
                raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
            if wsd_decay_iters > self.decay_iters - warmup_iters:
                raise ConfigError(f"--lr-wsd-decay-iters {wsd_decay_iters} is longer than the iterations after "
                                  f"warmup ({self.decay_iters} - {warmup_iters}); shorten it or the warmup")

    @classmethod
    def from_args(cls, optimizer, args) -> "OptimizerParamScheduler":
        return cls(optimizer, **settings_from_args(vars(args)), global_batch_size=args.global_batch_size)

    def get_lr(self, iteration: float, decoupled: bool = False, increment: float = 1.0) -> float:
        """LR of the update after ``iteration`` *applied* global batches (0-based; fractional under a batch ramp,
        where the update is ``increment`` of a global batch); ``decoupled``: of the embedding/output groups (the
        same shape between --decoupled-lr and --decoupled-min-lr, as Megatron's per-group max_lr/min_lr)."""
        max_lr, min_lr = (self.decoupled_lr, self.decoupled_min_lr) if decoupled else (self.max_lr, self.min_lr)
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            # the update's own samples count (one update ahead of Megatron's); capped: a warmup of whole samples
            # may end inside an iteration (Megatron's --lr-warmup-samples)
            return self.init_lr + (max_lr - self.init_lr) * min(1.0, (iteration + increment) / self.warmup_iters)
        if self.decay_style == "constant":
            return max_lr
        if iteration > self.decay_iters:  # Megatron's: at the decay's end exactly, each style's own value
            return min_lr
        if self.decay_style == "inverse-square-root":  # Megatron's, in samples: at least one of each
            g = self.global_batch_size
            lr = max_lr * math.sqrt(max(self.warmup_iters * g, 1)) / math.sqrt(max(iteration * g, 1))
            return max(min_lr, lr)
        progress = (iteration - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - progress
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
        else:  # WSD: stable at --lr, then anneal over the last --lr-wsd-decay-iters
            anneal_start = self.decay_iters - self.wsd_decay_iters
            if iteration < anneal_start:
                return max_lr
            coeff = _wsd_coeff(self.wsd_decay_style, (iteration - anneal_start) / self.wsd_decay_iters)
        return min_lr + coeff * (max_lr - min_lr)

    def get_wd(self, iteration: float) -> Optional[float]:
        """Weight decay of the update after ``iteration`` applied global batches; None: constant (the optimizer's
        own --weight-decay, unless the checkpoint's was taken)."""
        if self.wd_incr_style == "constant":
            return self._checkpoint_wd
        if iteration >= self.wd_incr_iters:
            return self.end_wd
        r = iteration / self.wd_incr_iters
        coeff = r if self.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - r)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def step(self, iteration: float, increment: float = 1.0) -> float:
        """Set and return the LR of iteration ``iteration`` (0-based; under a batch ramp, the global batches
        consumed before it, the update being ``increment`` of one), counting only the applied updates; set the
        weight decay of the decaying groups when it is scheduled."""
        applied = iteration - self.skipped_iters
        lr, wd = self.get_lr(applied, increment=increment), self.get_wd(applied)
        self.last_decoupled_lr = self.get_lr(applied, decoupled=True, increment=increment) \
            if self.decoupled_lr is not None else None
        for group in self.optimizer.param_groups:  # (a resume that keeps a schedule without them: the main LR)
            own = self.last_decoupled_lr if group.get("is_decoupled_lr") and self.decoupled_lr is not None else lr
            group["lr"] = own * group.get("lr_mult", 1.0)
            if wd is not None:
                group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return lr

    def skip(self, iterations: float = 1.0) -> None:
        """The update of the iteration just run was skipped: the next one gets its LR (``iterations``: its share of
        a full global batch, under --rampup-batch-size)."""
        self.skipped_iters += iterations

    def start_afresh(self, position: float) -> None:
        """Megatron's --no-load-optim loads no scheduler: a resume's schedule starts again from its first step at
        the loaded ``position`` (global batches), kept as updates it does not count; saved, so a later resume of
        this run goes on from where it is."""
        self.skipped_iters = position

    def settings(self) -> dict:
        return dict(max_lr=self.max_lr, min_lr=self.min_lr, init_lr=self.init_lr, warmup_iters=self.warmup_iters,
                    decay_iters=self.decay_iters, decay_style=self.decay_style,
                    wsd_decay_iters=self.wsd_decay_iters, wsd_decay_style=self.wsd_decay_style,
                    start_wd=self.start_wd, end_wd=self.end_wd, wd_incr_iters=self.wd_incr_iters,
                    wd_incr_style=self.wd_incr_style, decoupled_lr=self.decoupled_lr,
                    decoupled_min_lr=self.decoupled_min_lr)

    def state_dict(self) -> dict:
        return dict(self.settings(), skipped_iters=self.skipped_iters)

    def load_state_dict(self, saved: Optional[dict], override: bool = False, use_checkpoint: bool = False) -> None:
        """On resume: ``override`` keeps this run's settings, ``use_checkpoint`` takes the checkpoint's; neither
        and they differ is an error naming every differing setting (a silent change jumps the LR mid-run). The
        count of skipped updates is progress, not a setting: it is always restored."""
        if not saved:
            return
        self.skipped_iters = saved.get("skipped_iters", 0)
        if override:
            return
        saved = {**_DEFAULTS, **saved}
        now = self.settings()
        if saved["wd_incr_style"] == "constant" and saved["start_wd"] is None:  # saved before it was recorded
            saved["start_wd"], saved["end_wd"] = now["start_wd"], now["end_wd"]
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if diff and not use_checkpoint:
            constant = saved["wd_incr_style"] == now["wd_incr_style"] == "constant"
            labels = dict(_LABELS, start_wd="--weight-decay") if constant else _LABELS
            what = ", ".join(f"{labels[k]} {a} in the checkpoint, {b} now" for k, (a, b) in
                             ((k, _shown(*ab)) for k, ab in diff.items() if not (constant and k == "end_wd")))
            raise ConfigError(f"resuming would change the LR schedule ({what}); pass --override-opt-param-scheduler "
                              "to use this run's values or --use-checkpoint-opt-param-scheduler to keep the "
                              "checkpoint's")
        if use_checkpoint and saved["decoupled_lr"] is not None and self.decoupled_lr is None:
            raise ConfigError(f"the checkpoint's LR schedule gives the embedding and output layer --decoupled-lr "
                              f"{saved['decoupled_lr']:g}, which needs their own optimizer groups: pass --decoupled-lr "
                              f"{saved['decoupled_lr']:g} --decoupled-min-lr {saved['decoupled_min_lr']:g}")
        for k, (a, _) in diff.items():
            setattr(self, k, a)
        if self.wd_incr_style == "constant" and "start_wd" in diff:  # the checkpoint's constant weight decay
            self._checkpoint_wd = self.start_wd


def _wsd_coeff(style: str, r: float) -> float:
    """Megatron's WSD anneal shapes, each from 1 at the start of the anneal to 0 at its end."""
    if style == "linear":
        return 1.0 - r
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * r) + 1.0)
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(r)
    return 2.0 * math.pow(0.5, r) - 1.0  # exponential
