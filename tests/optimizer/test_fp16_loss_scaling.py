"""fp16 loss scaling against Megatron's ``grad_scaler.py`` and ``MixedPrecisionOptimizer``: the dynamic scale's
update rule step by step, its checkpointed state, a constant ``--loss-scale`` that the command line owns, the
settings Megatron asserts (as one ConfigError each), a skipped step that changes no optimizer state, and the
``skipped_for_loss_scale`` mark the training loop needs to tell the scale's search from a diverging run.
One process; the all-rank overflow decision is test_fp16_overflow_global.py."""
import random
import re

import pytest
import torch

from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.optimizer import (ConstantGradScaler, DistributedDataParallel, DynamicGradScaler, OptimizerConfig,
                                 get_megatron_optimizer)
from zero_harness import CFG, OPT, SEED, batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class MegatronDynamic:
    """Megatron-LM's DynamicGradScaler.update, transcribed (megatron/core/optimizer/grad_scaler.py)."""

    def __init__(self, initial, min_scale, interval, hysteresis):
        self.scale, self.min, self.interval, self.hysteresis = initial, min_scale, interval, hysteresis
        self.growth, self.hyst = 0, hysteresis

    def update(self, found_inf):
        if found_inf:
            self.growth = 0
            self.hyst -= 1
            if self.hyst <= 0:
                self.scale = max(self.scale * 0.5, self.min)
        else:
            self.growth += 1
            if self.growth == self.interval:
                self.growth, self.hyst = 0, self.hysteresis
                self.scale = self.scale * 2.0


@pytest.mark.parametrize("interval,hysteresis,min_scale", [(3, 2, 1.0), (1, 1, 1.0), (5, 3, 2.0 ** 20), (2, 4, 1.0)])
def test_dynamic_scale_follows_megatron(interval, hysteresis, min_scale):
    rng = random.Random(interval * 10 + hysteresis)
    ours = DynamicGradScaler(2.0 ** 32, min_scale, growth_interval=interval, hysteresis=hysteresis)
    ref = MegatronDynamic(2.0 ** 32, min_scale, interval, hysteresis)
    for step in range(400):
        found = rng.random() < (0.9 if step < 40 else 0.5)  # a long overflow run to the floor, then a mix
        ours.update(found)
        ref.update(found)
        state = ours.state_dict()
        assert (state["scale"], state["growth_tracker"], state["hysteresis_tracker"]) == \
            (ref.scale, ref.growth, ref.hyst), f"step {step}"


def test_dynamic_state_round_trip_is_exact():
    a = DynamicGradScaler(2.0 ** 32, 1.0, growth_interval=3, hysteresis=2)
    for found in (True, True, True, False, False, True):
        a.update(found)
    b = DynamicGradScaler(2.0 ** 16, 1.0, growth_interval=3, hysteresis=2)
    b.load_state_dict(a.state_dict())
    for found in (False, False, False, True, True, False):
        a.update(found)
        b.update(found)
        assert a.state_dict() == b.state_dict()


def test_constant_scale_is_the_command_lines():
    """Megatron's ConstantGradScaler loads nothing: resuming with --loss-scale 128 trains at 128, whatever the
    checkpoint's (dynamic or another constant) scale was."""
    c = ConstantGradScaler(128.0)
    c.load_state_dict({"scale": 262144.0, "growth_tracker": 1, "hysteresis_tracker": 2})
    assert float(c.scale) == 128.0
    c.load_state_dict(ConstantGradScaler(1024.0).state_dict())
    assert float(c.scale) == 128.0


@pytest.mark.parametrize("kw,words", [
    (dict(min_loss_scale=2.0 ** 20, initial_loss_scale=1024.0), "--min-loss-scale"),
    (dict(hysteresis=0), "--hysteresis"), (dict(loss_scale_window=0), "--loss-scale-window"),
    (dict(min_loss_scale=0.0), "--min-loss-scale")])
def test_bad_dynamic_settings_are_one_config_error(kw, words):
    with pytest.raises(ConfigError, match=words):
        OptimizerConfig(fp16=True, **kw).validate()
    OptimizerConfig(fp16=True, loss_scale=64.0, **kw).validate()  # a constant scale does not use them
    OptimizerConfig(bf16=True, **kw).validate()


def _make(**cfg):
    model = build_model(CFG, seed=SEED, dtype=torch.float16)
    ddp = DistributedDataParallel(model, zero_stage=0)
    opt = get_megatron_optimizer(OptimizerConfig(**dict(OPT, fp16=True, params_dtype=torch.float16, **cfg)), [ddp])
    return ddp, opt


def _step(ddp, opt, step, inject=False):
    opt.zero_grad()
    x, y = batch(step)
    loss = ddp(x, labels=y).float().mean()
    opt.scale_loss(loss).backward()
    ddp.finish_grad_sync()
    if inject:
        opt.pieces[0].grad_view[0] = float("inf")
    return opt.step()[0]


def _state(opt):
    return [(pc.master.clone(), pc.model_view.clone(),
             {k: v.clone() for k, v in opt.optimizer.state.get(pc.master, {}).items()}) for pc in opt.pieces]


def test_skipped_step_changes_no_state_and_marks_the_search():
    ddp, opt = _make(initial_loss_scale=4.0, min_loss_scale=2.0, hysteresis=1)
    assert _step(ddp, opt, 0)
    before, steps = _state(opt), opt.num_steps
    assert not _step(ddp, opt, 1, inject=True)
    assert opt.skipped_for_loss_scale and float(opt.get_loss_scale()) == 2.0
    for (m0, p0, s0), (m1, p1, s1) in zip(before, _state(opt)):
        assert torch.equal(m0, m1) and torch.equal(p0, p1) and s0.keys() == s1.keys()
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert opt.num_steps == steps
    assert not _step(ddp, opt, 2, inject=True)  # at the floor: no search left, the loop counts this one
    assert not opt.skipped_for_loss_scale and float(opt.get_loss_scale()) == 2.0
    assert _step(ddp, opt, 3) and not opt.skipped_for_loss_scale
    ddp, opt = _make(loss_scale=8.0)
    assert not _step(ddp, opt, 0, inject=True) and not opt.skipped_for_loss_scale  # a constant scale has no search


def test_clean_dynamic_scale_equals_the_same_constant_scale():
    """Scaling by a power of two and back is exact: a dynamic scale that never overflows trains bit for bit as the
    constant one (scale 1 is not: fp16 gradients below 2^-24 flush to zero, and Adam turns a flushed element's
    update into a whole step)."""
    runs = {}
    for name, cfg in (("dynamic", dict(initial_loss_scale=2.0 ** 12)), ("constant", dict(loss_scale=2.0 ** 12))):
        ddp, opt = _make(**cfg)
        assert all(_step(ddp, opt, s) for s in range(3))
        runs[name] = [p.detach().float().clone() for p in ddp.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["dynamic"], runs["constant"]))


def test_resume_across_precisions_says_what_is_lost(capsys):
    ddp, opt = _make(initial_loss_scale=2.0 ** 10, hysteresis=1)
    assert not _step(ddp, opt, 0, inject=True)
    fp16_state = opt.state_dict()
    model = build_model(CFG, seed=SEED, dtype=torch.bfloat16)
    bf16 = get_megatron_optimizer(OptimizerConfig(**OPT, bf16=True, params_dtype=torch.bfloat16),
                                  [DistributedDataParallel(model, zero_stage=0)])
    bf16.load_state_dict(dict(fp16_state, pieces=bf16.state_dict()["pieces"]))
    assert "fp16 loss scale (512) is dropped" in capsys.readouterr().err
    ddp2, opt2 = _make(initial_loss_scale=2.0 ** 16)
    opt2.load_state_dict(bf16.state_dict())
    assert "starts afresh at --initial-loss-scale 65536" in capsys.readouterr().err
    opt2.load_state_dict(fp16_state)  # fp16 -> fp16: scale and counters, silently
    assert opt2.grad_scaler.state_dict() == opt.grad_scaler.state_dict() and not capsys.readouterr().err


@pytest.mark.parametrize("prec", [dict(bf16=True), dict()])
def test_a_constant_scale_without_fp16_is_refused_not_ignored(prec):
    """Megatron scales bf16 by --loss-scale as well; megallama's bf16/fp32 step does not, so the flag would do
    nothing: one line instead (scale 1, a no-op, is true and accepted)."""
    with pytest.raises(ConfigError, match="--loss-scale 1024 applies to --fp16 only"):
        OptimizerConfig(loss_scale=1024.0, **prec).validate()
    OptimizerConfig(loss_scale=1.0, **prec).validate()


@pytest.mark.parametrize("prec", [dict(bf16=True), dict()])
def test_fp16_params_without_fp16_loss_scaling_are_refused(prec):
    """fp16 weight gradients need the loss scale (Megatron's fp16 params come only with --fp16)."""
    with pytest.raises(ConfigError, match="--params-dtype fp16 needs --fp16"):
        OptimizerConfig(params_dtype=torch.float16, **prec).validate()
    OptimizerConfig(params_dtype=torch.float16, fp16=True).validate()
    OptimizerConfig(params_dtype=torch.bfloat16, **prec).validate()  # bf16 storage in an fp32 run is fine


def _pretrain_argv(tmp_path, *extra):
    return ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2",
            "--mock-data", "--device", "cpu", "--no-progress-bar", "--log-interval", "5", *extra]


def test_megatrons_initial_scale_backs_off_without_stopping_the_run(tmp_path, capsys):
    """From Megatron's 2^32 the scale needs ~14 overflow skips here to come down: they are the search, not a
    divergence, so --max-skipped-iters (10) must not stop the run (it did, at iteration 10). A 512-token vocabulary
    (14 skips still) keeps the CPU's slow fp16 head small."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    out = pretrain(parse_args(_pretrain_argv(tmp_path, "--fp16", "--initial-loss-scale", str(2 ** 32),
                                             "--train-iters", "20", "--vocab-size", "512",
                                             "--log-num-zeros-in-grad"), world_size=1))
    assert sorted(out["losses"]) == list(range(1, 21))
    # as Megatron's log: an interval of skips has no loss, a skipped update no grad norm or zeros (were printed)
    lines = {int(m.group(1)): ln for ln in capsys.readouterr().out.splitlines()
             if (m := re.search(r"\] iteration +(\d+)/", ln))}
    assert all(f not in lines[5] for f in ("lm loss", "grad norm", "num zeros")) and "skipped iterations:   5" in lines[5]
    assert all(f in lines[20] for f in ("lm loss", "grad norm", "num zeros")), lines[20]


def test_bf16_checkpoint_resumed_in_fp16_says_the_scale_starts_afresh(tmp_path, capsys):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    ck = str(tmp_path / "ck")
    pretrain(parse_args(_pretrain_argv(tmp_path, "--bf16", "--train-iters", "2", "--save", ck), world_size=1))
    capsys.readouterr()
    pretrain(parse_args(_pretrain_argv(tmp_path, "--fp16", "--train-iters", "3", "--load", ck, "--lr-decay-iters",
                                       "2"), world_size=1))
    said = capsys.readouterr()
    assert "dynamic loss scaling starts afresh at --initial-loss-scale" in said.out + said.err
