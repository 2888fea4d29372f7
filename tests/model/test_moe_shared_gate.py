"""--moe-shared-expert-gate (Megatron's SharedExpertMLP gate, Qwen2-MoE's shared_expert_gate): the formula, tp 2 with
and without sequence parallelism against one process (gloo ranks; loss 1e-5 relative, every gradient 1e-5 relative
norm), a tp 2 checkpoint loaded by one process, the one-line errors; and upcycling's shared expert (fresh, as
Megatron, or copied with --moe-upcycle-shared-expert)."""
import pytest
import torch

from dist_utils import rel_err, run_distributed
from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.model.moe import MoEConfig, MoELayer, set_aux_loss_scale
from megallama.mpu import parallel_state as ps
from megallama.strategies import TrainingStrategy, apply_strategy
from strategies.strat_helpers import TINY, batch, reduce_like_ddp

GATED = {"num_experts": 4, "experts_per_token": 2, "moe_shared_expert_intermediate_size": 32,
         "moe_shared_expert_gate": True, "moe_aux_loss_coeff": 1e-2}
SEED = 5


def _model(params=GATED, sp=False, seed=SEED):
    m = build_model(TINY, seed=seed, sequence_parallel=sp)
    apply_strategy([m], TrainingStrategy("moe", dict(params)), seed=seed)
    return m


def test_gate_scales_the_shared_expert_by_a_per_token_sigmoid():
    """out = routed + sigmoid(x @ w.T) * mlp(x), w: [1, h] (Megatron's forward; HF Qwen2MoeSparseMoeBlock's)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, topk=2, shared_expert_intermediate_size=48, shared_expert_gate=True)
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("model.layers.0.mlp", SEED)
    sh = layer.shared_experts
    assert tuple(sh.gate_weight.shape) == (1, TINY.hidden_size) and sh.gate_weight.std() > 0
    x = torch.randn(2, 5, TINY.hidden_size)
    with torch.no_grad():
        ungated = MoELayer(TINY, MoEConfig(num_experts=4, topk=2, shared_expert_intermediate_size=48), 0)
        ungated.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "shared_experts.gate_weight"})
        plain = ungated.shared_experts(x)
        want = ungated(x) - plain + torch.sigmoid(x @ sh.gate_weight.T) * plain
        torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert "model.layers.0.mlp.shared_experts.gate_weight" in dict(_model().named_parameters())


def _run(model, mbs=2, n=2):
    set_aux_loss_scale(1.0 / n)
    total = torch.zeros(())
    for i in range(n):
        ids, labels = batch(mbs, seed=i)
        loss = model(ids, labels=labels).mean()
        (loss / n).backward()
        total += loss.detach() / n
    return total


def _tp_worker(rank, world):
    out = []
    for sp in (False, True):
        ps.initialize_model_parallel(2, 1)
        m = _model(sp=sp)
        out.append(reduce_like_ddp(m, _run(m), 1))
        ps.destroy_model_parallel()
    return out


def _one_worker(rank, world):
    m = _model()
    loss = _run(m)
    return float(loss), {n: p.grad.numpy() for n, p in m.named_parameters()}


def test_gate_under_tp2_with_and_without_sp_equals_one_process():
    ref_loss, ref = run_distributed(_one_worker, 1)[0]
    gate = "model.layers.0.mlp.shared_experts.gate_weight"
    assert gate in ref and abs(ref[gate]).sum() > 0
    for sp, (loss, grads) in zip((False, True), run_distributed(_tp_worker, 2)[0]):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (sp, loss, ref_loss)
        assert set(grads) == set(ref)
        for n, g in grads.items():
            assert rel_err(torch.from_numpy(g), torch.from_numpy(ref[n])) < 1e-5, (sp, n)


def _ckpt_worker(rank, world, save_dir):
    from types import SimpleNamespace
    from megallama.checkpointing import save_checkpoint
    ps.initialize_model_parallel(2, 1)
    m = _model(sp=True)
    with torch.no_grad():  # a trained gate, not the init any model would redraw
        m.model.layers["0"].mlp.shared_experts.gate_weight.add_(0.5)
    save_checkpoint(save_dir, 1, [m], None, SimpleNamespace(model="moe", model_config=m.config), consumed_samples=0)
    return True


def test_gate_checkpoint_saved_at_tp2_loads_into_one_process(tmp_path):
    from types import SimpleNamespace
    from megallama.checkpointing import load_checkpoint
    run_distributed(_ckpt_worker, 2, str(tmp_path / "tp2"))
    want = _model()
    with torch.no_grad():
        want.model.layers["0"].mlp.shared_experts.gate_weight.add_(0.5)
    fresh = _model(seed=99)
    load_checkpoint(str(tmp_path / "tp2"), [fresh], None, SimpleNamespace(model="moe", model_config=fresh.config))
    got, ref = fresh.state_dict(), want.state_dict()
    assert sorted(got) == sorted(ref) and "model.layers.1.mlp.shared_experts.gate_weight" in got
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, rtol=0, atol=0, msg=n)


def test_gate_without_a_shared_expert_is_one_error_line():
    with pytest.raises(ConfigError, match="--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size"):
        _model({"num_experts": 4, "moe_shared_expert_gate": True})


def test_flag_reaches_the_model():
    from megallama.arguments import parse_args
    from megallama.strategies import strategy_from_args
    tiny = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--num-experts", "4",
            "--moe-shared-expert-intermediate-size", "64"]
    cfg = strategy_from_args(parse_args(tiny + ["--moe-shared-expert-gate"])).moe_config(2)
    assert cfg.shared_expert_gate and not strategy_from_args(parse_args(tiny)).moe_config(2).shared_expert_gate


# ------------------------------------------------------------------ upcycling and the shared expert
def _upcycled(params):
    m = build_model(TINY, seed=SEED)
    dense = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_strategy([m], TrainingStrategy("moe", dict(params, upcycle=True)), seed=SEED)
    return m, dense


def test_upcycling_keeps_the_shared_expert_fresh_as_megatron():
    m, dense = _upcycled({"num_experts": 4, "moe_shared_expert_intermediate_size": TINY.ffn_hidden_size})
    shared = m.model.layers["0"].mlp.shared_experts
    assert not torch.equal(shared.gate_proj.weight, dense["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(m.model.layers["0"].mlp.experts.down_proj[3], dense["model.layers.0.mlp.down_proj.weight"])


def test_upcycle_shared_expert_copies_the_dense_mlp():
    m, dense = _upcycled({"num_experts": 4, "moe_shared_expert_intermediate_size": TINY.ffn_hidden_size,
                          "moe_upcycle_shared_expert": True})
    for i in ("0", "1"):
        for name in ("gate_proj", "up_proj", "down_proj"):
            got = getattr(m.model.layers[i].mlp.shared_experts, name).weight
            assert torch.equal(got, dense[f"model.layers.{i}.mlp.{name}.weight"]), (i, name)


def test_upcycle_shared_expert_of_another_size_is_one_error_line():
    with pytest.raises(ConfigError, match=r"--moe-shared-expert-intermediate-size is 32; set it to 64 or drop "
                                          r"--moe-upcycle-shared-expert"):
        _upcycled({"num_experts": 4, "moe_shared_expert_intermediate_size": 32, "moe_upcycle_shared_expert": True})


def test_upcycle_shared_expert_without_upcycling_is_one_error_line():
    from megallama.arguments import parse_args
    with pytest.raises((ConfigError, SystemExit)):
        parse_args(["--model", "tiny_llama3_50m", "--num-experts", "4", "--moe-shared-expert-intermediate-size", "64",
                    "--moe-upcycle-shared-expert"])


def test_qwen2_moe_has_no_hf_mapping_here_and_is_refused_in_one_line():
    """megallama converts only HF Llama: a Qwen2-MoE config (shared_expert_gate) is refused, not half-mapped."""
    from megallama.checkpointing.hf_config import hf_config_to_model_config
    with pytest.raises(ConfigError, match="model_type 'qwen2_moe' is not Llama; only LlamaForCausalLM converts"):
        hf_config_to_model_config({"model_type": "qwen2_moe", "hidden_size": 64, "num_experts": 4,
                                   "shared_expert_intermediate_size": 128})


def test_resuming_a_gated_checkpoint_without_the_gate_names_the_flag(tmp_path):
    """The gate is part of the model: a resume without it is refused in one line that names the switch (no value)."""
    import subprocess
    import sys
    root = __file__.rsplit("/tests/", 1)[0]
    base = [sys.executable, f"{root}/pretrain_llama.py", "--model", "tiny_llama3_50m", "--num-layers", "2",
            "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups",
            "2", "--seq-length", "32", "--micro-batch-size", "2", "--mock-data", "--no-progress-bar", "--device",
            "cpu", "--num-experts", "4", "--moe-shared-expert-intermediate-size", "64", "--train-iters", "2",
            "--save", str(tmp_path)]
    subprocess.run(base + ["--moe-shared-expert-gate"], check=True, capture_output=True)
    out = subprocess.run(base + ["--load", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "was trained with --moe-shared-expert-gate, this run does not: resuming would change the model; pass " \
           "--moe-shared-expert-gate to resume it" in out.stderr + out.stdout, out.stderr[-500:]
