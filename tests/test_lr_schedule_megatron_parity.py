"""The LR and weight-decay schedule against Megatron's ``OptimizerParamScheduler`` written out here from its
definition (positions in samples of applied updates; the scheduler steps after each one): under a batch ramp, with
--train-samples that are not whole global batches, inverse-square-root without warmup and at the decay's end,
and a resume that changes a constant --weight-decay. Our warmup runs one update ahead of Megatron's (README), so
the comparisons are made where no warmup is running."""
import math

import pytest

import megallama.training as training
from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.lr_scheduler import OptimizerParamScheduler

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--no-progress-bar", "--device", "cpu",
        "--mock-data"]


def megatron_lr(n, max_lr, min_lr, warmup, decay, style):
    """Megatron's get_lr at ``n`` samples (init lr 0)."""
    if warmup > 0 and n <= warmup:
        return max_lr * n / warmup
    if style == "constant":
        return max_lr
    if n > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
    r = (n - warmup) / (decay - warmup)
    coeff = 1.0 - r if style == "linear" else 0.5 * (math.cos(math.pi * r) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


def megatron_wd(n, start, end, span):
    """Megatron's get_wd, linear increment."""
    return end if n > span else start + (n / span) * (end - start)


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": None, "weight_decay": 0.1, "wd_mult": 1.0}]


def test_a_batch_ramp_positions_the_schedule_at_the_samples_consumed(monkeypatch):
    """Was: (consumed + batch) / global batch - 1, which gave a negative weight decay and an LR above --lr while
    the batch was below the global batch."""
    seen, setup = [], training.setup_model_and_optimizer

    def spy(args, device):
        chunks, opt = setup(args, device)
        step = opt.step

        def recorded():
            seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
            return step()
        opt.step = recorded
        return chunks, opt
    monkeypatch.setattr(training, "setup_model_and_optimizer", spy)
    training.pretrain(parse_args(TINY + [
        "--global-batch-size", "16", "--train-samples", "60", "--rampup-batch-size", "4", "4", "24",
        "--lr-warmup-samples", "0", "--lr-decay-style", "linear", "--weight-decay-incr-style", "linear",
        "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"], world_size=1))
    consumed = 0
    for (lr, wd), gbs in zip(seen, [4, 4, 8, 12, 16, 16]):
        assert lr == pytest.approx(megatron_lr(consumed, 1e-2, 1e-3, 0, 60, "linear"), rel=1e-12), consumed
        assert wd == pytest.approx(megatron_wd(consumed, 0.0, 0.1, 60), rel=1e-12, abs=1e-15), consumed
        consumed += gbs
    assert len(seen) == 6


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_train_samples_decay_over_the_samples_not_whole_iterations(style):
    """--train-samples 100 at global batch 16: Megatron decays over 100 samples (6.25 batches), not 6 iterations."""
    args = parse_args(TINY + ["--global-batch-size", "16", "--train-samples", "100", "--lr-warmup-samples", "16",
                              "--lr-decay-style", style, "--weight-decay-incr-style", "linear",
                              "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"], world_size=1)
    s = OptimizerParamScheduler.from_args(_Opt(), args)
    assert (args.train_iters, s.decay_iters, s.wd_incr_iters) == (6, 6.25, 6.25)
    for k in range(2, 6):
        assert s.get_lr(k) == pytest.approx(megatron_lr(16 * k, 1e-2, 1e-3, 16, 100, style), rel=1e-12)
        assert s.get_wd(k) == pytest.approx(megatron_wd(16 * k, 0.0, 0.1, 100), rel=1e-12)


def test_inverse_square_root_counts_samples():
    """Without warmup Megatron's floor is one sample, not one iteration; at the decay's end it is still the
    formula (it drops to --min-lr after)."""
    s = OptimizerParamScheduler.from_args(_Opt(), parse_args(TINY + [
        "--global-batch-size", "4", "--train-iters", "8", "--lr-warmup-iters", "0",
        "--lr-decay-style", "inverse-square-root"], world_size=1))
    assert [s.get_lr(k) for k in range(6)] == pytest.approx(
        [megatron_lr(4 * k, 1e-2, 1e-3, 0, 32, "inverse-square-root") for k in range(6)], rel=1e-12)
    s = OptimizerParamScheduler(_Opt(), max_lr=1.0, min_lr=0.3, warmup_iters=4, decay_iters=10,
                                decay_style="inverse-square-root", global_batch_size=4)
    assert [s.get_lr(k) for k in (9, 10, 11)] == pytest.approx(
        [megatron_lr(4 * k, 1.0, 0.3, 16, 40, "inverse-square-root") for k in (9, 10, 11)], rel=1e-12)


def test_a_resume_with_another_constant_weight_decay_is_refused():
    """Megatron records start = end = --weight-decay for the constant style and checks them on resume."""
    def sched(wd):
        return OptimizerParamScheduler.from_args(_Opt(), parse_args(TINY + [
            "--global-batch-size", "4", "--train-iters", "8", "--weight-decay", str(wd)], world_size=1))
    saved = sched(0.1).state_dict()
    with pytest.raises(ConfigError, match=r"--weight-decay 0.1 in the checkpoint, 0.5 now\); pass "
                                          r"--override-opt-param-scheduler"):
        sched(0.5).load_state_dict(saved)
    kept = sched(0.5)
    kept.load_state_dict(saved, use_checkpoint=True)
    kept.step(0)
    assert kept.optimizer.param_groups[0]["weight_decay"] == 0.1  # the checkpoint's, applied
    ours = sched(0.5)
    ours.load_state_dict(saved, override=True)
    ours.step(0)
    assert ours.optimizer.param_groups[0]["weight_decay"] == 0.1  # untouched: the optimizer's own (set at 0.1 here)
    older = dict(saved, start_wd=None, end_wd=None)  # checkpoints from before the constant one was recorded
    sched(0.5).load_state_dict(older)
