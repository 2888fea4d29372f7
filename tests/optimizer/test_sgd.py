"""``--optimizer sgd`` (Megatron's: torch.optim.SGD with --sgd-momentum, L2 weight decay) in one process: every ZeRO
stage steps like torch's SGD on the same model (clipping on), 16-bit parameters keep fp32 masters and fp16 unscales
before the step, momentum 0 keeps no state, the state dict resumes exactly (also into another stage) and an Adam
state is refused by name. The flags: --optimizer sgd was refused before; now it is accepted with --sgd-momentum, and
the combinations that would silently do nothing the user meant are one error line each. The memory estimator prices
one fp32 state per parameter instead of Adam's two."""
import pytest
import torch

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.optimizer import OptimizerConfig
from sgd_harness import SGD, make_sgd, reference_sgd, torch_sgd
from zero_harness import batch, train

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--mock-data", "--vocab-size", "256", "--train-iters", "2", "--device", "cpu",
        "--no-progress-bar"]


@pytest.fixture(scope="module")
def reference():
    return reference_sgd(3)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_steps_equal_torch_sgd(stage, reference):
    ddp, opt = make_sgd(stage)
    assert isinstance(opt.optimizer, torch.optim.SGD) and opt.state_keys == ("momentum_buffer",)
    losses, norms = train(ddp, opt, 0, 3, num_microbatches=2)
    assert any(n > SGD["clip_grad"] for n in norms)  # clipping was active
    for a, b in zip(losses + norms, reference["losses"] + reference["norms"]):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, norms, reference)
    sd = ddp.state_dict()
    for k, ref in reference["params"].items():
        assert float((sd[k] - ref).norm() / ref.norm()) <= 1e-5, k
    held = opt.memory_footprint()
    assert held == {"master": 0, "momentum_buffer": 4 * sum(pc.numel for pc in opt.pieces)}  # one state, no Adam


def _steps_on_masters(dtype, fp16):
    """Three steps of a 16-bit model: its fp32 masters against torch SGD fed the same (unscaled) gradients."""
    ddp, opt = make_sgd(0, dtype=dtype, fp16=fp16, clip_grad=0.0)  # stage 0: each piece a whole parameter
    ref = {pc.key: pc.master.detach().clone().view(pc.shape) for pc in opt.pieces}
    ropt = torch_sgd(ref)
    for step in range(3):
        opt.zero_grad()
        x, y = batch(step)
        opt.scale_loss(ddp(x, labels=y).float().mean()).backward()
        ddp.finish_grad_sync()
        scale = float(opt.get_loss_scale())
        for pc in opt.pieces:
            ref[pc.key].grad = pc.grad_view.detach().float().view(pc.shape) / scale
        ok, _, _ = opt.step()
        assert ok
        ropt.step()
    return ddp, opt, ref, scale


@pytest.mark.parametrize("dtype,fp16", [(torch.bfloat16, False), (torch.float16, True)])
def test_16bit_parameters_step_fp32_masters(dtype, fp16):
    ddp, opt, ref, scale = _steps_on_masters(dtype, fp16)
    assert scale == (2.0 ** 16 if fp16 else 1.0)
    for pc in opt.pieces:
        assert pc.master.dtype == torch.float32 and pc.model_view.dtype == dtype
        torch.testing.assert_close(pc.master, ref[pc.key].reshape(-1), rtol=1e-6, atol=1e-7)
        assert torch.equal(pc.model_view, pc.master.to(dtype))
    assert set(opt.memory_footprint()) == {"master", "momentum_buffer"}


def test_momentum_zero_keeps_no_state():
    ddp, opt = make_sgd(1, sgd_momentum=0.0)
    train(ddp, opt, 0, 1, num_microbatches=1)
    assert opt.state_keys == () and all(not st for st in opt.optimizer.state.values())
    assert "momentum_buffer" not in next(iter(opt.state_dict()["pieces"].values()))


@pytest.mark.parametrize("saved_stage,resumed_stage", [(1, 1), (0, 3)])
def test_state_dict_resumes_the_straight_run(saved_stage, resumed_stage, reference):
    ddp, opt = make_sgd(saved_stage)
    train(ddp, opt, 0, 2)
    model_sd, opt_sd = ddp.state_dict(), opt.state_dict()
    assert all("momentum_buffer" in e for e in opt_sd["pieces"].values())
    ddp2, opt2 = make_sgd(resumed_stage)
    ddp2.load_state_dict(model_sd)
    opt2.load_state_dict(opt_sd)
    losses, _ = train(ddp2, opt2, 2, 1)
    assert abs(losses[0] - reference["losses"][2]) <= 1e-5 * reference["losses"][2]
    sd = ddp2.state_dict()
    for k, ref in reference["params"].items():
        assert float((sd[k] - ref).norm() / ref.norm()) <= 1e-5, k


def test_adam_state_into_sgd_names_the_optimizer():
    from zero_harness import make
    ddp, adam = make(1)
    train(ddp, adam, 0, 1)
    _, opt = make_sgd(1)
    with pytest.raises(ConfigError, match=r"lacks 'momentum_buffer' \(it holds exp_avg, exp_avg_sq: saved by another "
                                          r"optimizer .*--optimizer sgd.*pass the --optimizer it was trained with"):
        opt.load_state_dict(adam.state_dict())


def test_onebit_adam_refuses_sgd_in_the_python_api():
    from megallama.optimizer.compression_onebit import install_onebit_adam
    _, opt = make_sgd(1)
    with pytest.raises(ConfigError, match="onebit is 1-bit Adam and cannot drive --optimizer sgd"):
        install_onebit_adam(opt, 2)


def test_config_checks():
    with pytest.raises(ConfigError, match="--sgd-momentum"):
        OptimizerConfig(optimizer="sgd", sgd_momentum=1.0).validate()
    with pytest.raises(ConfigError, match="fix --optimizer"):
        OptimizerConfig(optimizer="lion").validate()


# ------------------------------------------------------------------ flags
def test_optimizer_sgd_is_accepted_with_megatrons_default_momentum():
    """Was: '--optimizer sgd is not supported: megallama trains with Adam'."""
    a = parse_args(TINY + ["--optimizer", "sgd"], world_size=1)
    assert (a.optimizer, a.sgd_momentum) == ("sgd", 0.9)
    a = parse_args(TINY + ["--optimizer", "sgd", "--sgd-momentum", "0", "--adam-beta1", "0.5"], world_size=1)
    assert (a.optimizer, a.sgd_momentum) == ("sgd", 0.0)  # Adam's flags are accepted and unused, as in Megatron
    assert parse_args(TINY, world_size=1).optimizer == "adam"


@pytest.mark.parametrize("flags,says", [
    (["--sgd-momentum", "0.9"], "--sgd-momentum 0.9 is the momentum of --optimizer sgd, but this run trains with "
                                "--optimizer adam (AdamW); add --optimizer sgd or drop --sgd-momentum"),
    (["--optimizer", "sgd", "--sgd-momentum", "1.5"], "--sgd-momentum 1.5 must be in [0, 1)"),
    (["--optimizer", "sgd", "--gradient-compression", "onebit", "--zero-stage", "1"],
     "--gradient-compression onebit is 1-bit Adam"),
    (["--optimizer", "muon"], "--optimizer muon is not supported: megallama trains with adam (AdamW) or sgd"),
], ids=["momentum-without-sgd", "momentum-range", "onebit", "muon"])
def test_bad_combinations_are_one_line(flags, says):
    with pytest.raises(ConfigError) as e:
        parse_args(TINY + flags, world_size=1)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------ memory estimate
@pytest.mark.parametrize("precision,adam_k,sgd_k", [([], 8, 4), (["--bf16"], 12, 8)])
def test_estimate_prices_one_state(precision, adam_k, sgd_k):
    from megallama.memory_args import estimate_for_args
    from megallama.memory_cli import run
    adam = estimate_for_args(parse_args(TINY + precision, world_size=1), 1, recommend=False)
    sgd = estimate_for_args(parse_args(TINY + precision + ["--optimizer", "sgd"], world_size=1), 1, recommend=False)
    n = adam["params_per_gpu"]
    assert adam["breakdown_bytes"]["optimizer"] == adam_k * n and sgd["breakdown_bytes"]["optimizer"] == sgd_k * n
    cli = ["--model", "llama2_7b", "--gpus", "8", "--zero-stage", "1"] + (["--bf16"] if precision else
                                                                          ["--precision", "fp32"])
    a, s = run(cli)["estimate"], run(cli + ["--optimizer", "sgd"])["estimate"]
    assert s["breakdown_bytes"]["optimizer"] == pytest.approx(a["breakdown_bytes"]["optimizer"] * sgd_k / adam_k,
                                                              rel=1e-9)
    plain = run(cli + ["--optimizer", "sgd", "--sgd-momentum", "0"])["estimate"]
    assert plain["breakdown_bytes"]["optimizer"] == pytest.approx(a["breakdown_bytes"]["optimizer"] *
                                                                  (sgd_k - 4) / adam_k, rel=1e-9)
