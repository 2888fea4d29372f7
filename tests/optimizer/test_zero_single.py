"""Single-process checks of the DDP/ZeRO optimizer: dp = 1 for every stage (no process group at all), bf16 model
with fp32 masters, fp16 loss scaling and the skipped step on inf/NaN, the dynamic scaler, and user errors."""
import pytest
import torch

from dist_utils import rel_err
from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.optimizer import (DistributedDataParallel, DynamicGradScaler, OptimizerConfig,
                                 get_megatron_optimizer)
from zero_harness import CFG, OPT, SEED, batch, make, reference_run, train

STEPS = 6


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp1_every_stage_matches_torch_adamw(reference, stage):
    ddp, opt = make(stage, bucket_size=3000)
    assert ddp.dp_size == 1 and ddp.dp_group is None
    losses, norms = train(ddp, opt, 0, STEPS)
    for a, b in zip(losses, reference["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for a, b in zip(norms, reference["norms"]):
        assert abs(a - b) <= 1e-5 * b
    sd = ddp.state_dict()
    for k, v in sd.items():
        assert rel_err(v, reference["params"][k]) <= 1e-5, k
    # dp = 1: nothing padded, nothing freed, only the contiguous grad buffer on top of the model
    assert ddp.layout.numel == ddp.layout.numel_unpadded
    assert all(p.numel() > 0 for p in ddp.module.parameters())


def test_bf16_model_keeps_fp32_masters():
    ddp, opt = make(2, dtype=torch.bfloat16)
    train(ddp, opt, 0, 2)
    n = sum(p.numel() for p in ddp.module.parameters())
    mem = opt.memory_footprint()
    assert mem["master"] == 4 * n and mem["exp_avg"] == 4 * n and mem["exp_avg_sq"] == 4 * n  # K = 12
    assert ddp.grad_buffer.dtype == torch.float32 and ddp.param_buffer.dtype == torch.bfloat16
    for pc in opt.pieces:  # the model holds the bf16 rounding of the fp32 master
        assert torch.equal(pc.model_view, pc.master.to(torch.bfloat16))
        assert pc.master.dtype == torch.float32


def test_fp16_loss_scaling_and_skipped_step(reference):
    model = build_model(CFG, seed=SEED)
    ddp = DistributedDataParallel(model, zero_stage=1)
    opt = get_megatron_optimizer(OptimizerConfig(**OPT, fp16=True, initial_loss_scale=2.0 ** 10, hysteresis=1), [ddp])
    assert float(opt.get_loss_scale()) == 1024.0
    x, y = batch(0)
    opt.zero_grad()
    opt.scale_loss(ddp(x, labels=y).mean()).backward()
    ddp.finish_grad_sync()
    ok, norm, _ = opt.step()
    assert ok and abs(norm - reference["norms"][0]) <= 1e-5 * norm  # unscaled before the norm
    before = {k: v.clone() for k, v in ddp.state_dict().items()}
    opt.zero_grad()
    opt.scale_loss(ddp(x, labels=y).mean()).backward()
    ddp.finish_grad_sync()
    ddp.grad_buffer[3] = float("inf")
    ok, norm, _ = opt.step()
    assert not ok and norm == float("inf")
    assert float(opt.get_loss_scale()) == 512.0  # backed off
    for k, v in ddp.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    ok, _, _ = _step(ddp, opt, x, y)
    assert ok


def _step(ddp, opt, x, y):
    opt.zero_grad()
    opt.scale_loss(ddp(x, labels=y).mean()).backward()
    ddp.finish_grad_sync()
    return opt.step()


def test_nan_grads_skip_the_step_without_fp16():
    ddp, opt = make(0)
    x, y = batch(0)
    opt.zero_grad()
    ddp(x, labels=y).mean().backward()
    ddp.finish_grad_sync()
    ddp.grad_buffer[0] = float("nan")
    before = [p.detach().clone() for p in ddp.module.parameters()]
    ok, norm, _ = opt.step()
    assert not ok
    assert all(torch.equal(a, b) for a, b in zip(before, ddp.module.parameters()))
    assert float(opt.get_loss_scale()) == 1.0


def test_dynamic_grad_scaler_backoff_hysteresis_and_growth():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert float(s.scale) == 8.0  # first overflow absorbed by hysteresis
    s.update(True)
    assert float(s.scale) == 4.0
    s.update(True)
    assert float(s.scale) == 2.0
    s.update(True)
    assert float(s.scale) == 2.0  # min
    for _ in range(3):
        s.update(False)
    assert float(s.scale) == 4.0
    t = DynamicGradScaler()
    t.load_state_dict(s.state_dict())
    assert float(t.scale) == 4.0 and t.state_dict() == s.state_dict()


def test_user_errors_name_the_value():
    model = build_model(CFG, seed=SEED)
    with pytest.raises(ConfigError, match="zero stage 4"):
        DistributedDataParallel(model, zero_stage=4)
    with pytest.raises(ConfigError, match="bucket size 0"):
        DistributedDataParallel(model, bucket_size=0)
    with pytest.raises(ConfigError, match="bf16 and fp16"):
        OptimizerConfig(bf16=True, fp16=True).validate()
    with pytest.raises(ConfigError, match="not a megallama DistributedDataParallel"):
        get_megatron_optimizer(OptimizerConfig(), [model])
    model.lm_head.weight.data = model.lm_head.weight.data.half()
    with pytest.raises(ConfigError, match="mixed dtypes"):
        DistributedDataParallel(model)


def test_state_dict_round_trip_and_incomplete_state():
    ddp, opt = make(1)
    train(ddp, opt, 0, 2)
    sd = opt.state_dict()
    assert sd["step"] == 2 and all({"master", "exp_avg", "exp_avg_sq"} <= set(e) for e in sd["pieces"].values())
    ddp2, opt2 = make(3)
    ddp2.load_state_dict(ddp.state_dict())
    opt2.load_state_dict(sd)
    a, _ = train(ddp, opt, 2, 2)
    b, _ = train(ddp2, opt2, 2, 2)
    assert a == pytest.approx(b, rel=1e-6)
    key = next(iter(sd["pieces"]))
    sd["pieces"][key] = dict(sd["pieces"][key], end=sd["pieces"][key]["end"] - 1)
    sd["pieces"][key]["master"] = sd["pieces"][key]["master"][:-1]
    with pytest.raises(ConfigError, match="misses 1 of elements"):
        opt2.load_state_dict(sd)
