"""LoRA: exact trainable-parameter count, frozen base bit-identical after a step, merge == adapters, the fused
effective-weight path == the adapter path, adapter-only save/load, and tp=2 (with and without SP) == tp=1."""
import pytest
import torch

from dist_utils import rel_err, run_distributed
from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.model.lora import (LORA_TARGETS, LoRAConfig, apply_lora, gather_lora_state_dict, load_lora_state_dict,
                                  lora_modules, merge_lora, unmerge_lora)
from megallama.mpu import parallel_state as ps
from megallama.mpu.layers import column_parallel_linears
from megallama.strategies import TrainingStrategy, apply_strategy, trainable_parameter_count
from strat_helpers import TINY, batch, full_params_and_grads

ALL = {"lora_rank": 4, "lora_alpha": 8, "target_modules": list(LORA_TARGETS)}


def _lora_model(params=ALL, seed=3, sequence_parallel=False, randomize_b=True):
    m = build_model(TINY, seed=seed, sequence_parallel=sequence_parallel)
    apply_strategy([m], TrainingStrategy("lora", dict(params)), seed=seed)
    if randomize_b:  # B starts at zero; give it layout-independent values so the adapters matter
        from megallama.mpu.random import init_parameter
        for n, p in m.named_parameters():
            if n.endswith("lora_B.weight"):
                with torch.no_grad():
                    init_parameter(p, n, seed + 1, 0.05)
    return m


def test_trainable_count_is_r_times_din_plus_dout():
    m = _lora_model(randomize_b=False)
    h, f, kv = TINY.hidden_size, TINY.ffn_hidden_size, TINY.num_query_groups * TINY.head_dim
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, f),
              "up_proj": (h, f), "down_proj": (f, h)}
    r = 4
    expect = TINY.num_layers * sum(r * (din + dout) for din, dout in shapes.values())
    assert trainable_parameter_count([m]) == expect
    for name, mod in lora_modules(m).items():
        din, dout = shapes[name.rsplit(".", 1)[-1]]
        assert tuple(mod.lora_A.weight.shape) == (r, din) and tuple(mod.lora_B.weight.shape) == (dout, r)
    q = TrainingStrategy("lora", {"lora_rank": 2, "target_modules": ["q_proj", "v_proj"]})
    m2 = build_model(TINY, seed=3)
    apply_strategy([m2], q)
    assert trainable_parameter_count([m2]) == TINY.num_layers * 2 * ((h + h) + (h + kv))


def test_lora_step_keeps_base_bit_identical_and_trains_adapters():
    m = _lora_model(randomize_b=False)
    base = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, labels = batch(2)
    for _ in range(2):
        opt.zero_grad()
        m(ids, labels=labels).mean().backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in base:
            assert p.grad is None and n not in opt.state and torch.equal(p, base[n]), n
    assert all(not torch.equal(p, lora[n]) for n, p in m.named_parameters() if n in lora)
    assert len(opt.state) == len(lora)


def test_merged_logits_equal_adapter_logits_and_unmerge_restores():
    m = _lora_model()
    ids, _ = batch(2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        adapted = m(ids)
        plain = build_model(TINY, seed=3)(ids)
        merge_lora(m)
        merged = m(ids)
    assert rel_err(adapted, plain) > 1e-3  # the adapters change the output
    assert rel_err(merged, adapted) < 1e-5
    unmerge_lora(m)
    for n, p in m.named_parameters():
        assert rel_err(p, before[n]) < 1e-6, n


def test_effective_weight_path_equals_adapter_path():
    """q/k/v and gate/up may run through the fused ``column_parallel_linears`` (which reads ``.weight``), o/down
    through the layer: both must give the same output and adapter gradients."""
    m = _lora_model()
    q = m.model.layers["0"].self_attn.q_proj
    x = torch.randn(2, 5, TINY.hidden_size)
    y1 = q(x)
    g1 = torch.autograd.grad(y1.square().sum(), (q.lora_A.weight, q.lora_B.weight))
    (y2,) = column_parallel_linears(x, (q,))
    g2 = torch.autograd.grad(y2.square().sum(), (q.lora_A.weight, q.lora_B.weight))
    assert rel_err(y2, y1) < 1e-6
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-5


def test_adapter_only_checkpoint_round_trip(tmp_path):
    m = _lora_model()
    sd = gather_lora_state_dict([m])
    assert sd and all(".lora_" in k for k in sd)
    torch.save(sd, tmp_path / "adapter.pt")
    fresh = build_model(TINY, seed=3)
    apply_strategy([fresh], TrainingStrategy("lora", dict(ALL)), seed=99)
    n = load_lora_state_dict(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert n == len(sd)
    ids, _ = batch(1)
    with torch.no_grad():
        assert rel_err(fresh(ids), m(ids)) < 1e-6
    with pytest.raises(ConfigError, match="lora-rank"):
        bad = build_model(TINY, seed=3)
        apply_strategy([bad], TrainingStrategy("lora", dict(ALL, lora_rank=2)))
        load_lora_state_dict(bad, sd)


def test_bad_lora_config():
    with pytest.raises(ConfigError, match="lm_head"):
        LoRAConfig(target_modules=["lm_head"]).validate()
    with pytest.raises(ConfigError, match="lora-rank"):
        LoRAConfig(rank=0).validate()
    m = build_model(TINY, seed=3)
    apply_lora(m, LoRAConfig(rank=2, target_modules=["o_proj"]))
    with pytest.raises(ConfigError, match="already"):
        apply_lora(m, LoRAConfig(rank=2, target_modules=["o_proj"]))


def test_zero_alpha_is_refused_and_repeated_targets_are_one():
    """--lora-alpha 0 trained for the whole run with a zero update and zero gradients; q_proj,q_proj was recorded
    twice (a resume naming q_proj once was refused as another model)."""
    with pytest.raises(ConfigError, match="--lora-alpha 0 .* never train"):
        TrainingStrategy("lora", {"lora_rank": 4, "lora_alpha": 0}).lora_config()
    cfg = TrainingStrategy("lora", {"target_modules": "q_proj,v_proj,q_proj"}).lora_config()
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert TrainingStrategy("lora", {"lora_rank": 4, "lora_alpha": -4}).lora_config().scaling == -1.0  # legal


def test_lora_dropout_applies_in_training_only():
    m = _lora_model(dict(ALL, lora_dropout=0.5))
    o = m.model.layers["0"].self_attn.o_proj
    x = torch.randn(2, 3, TINY.hidden_size)
    assert not torch.equal(o(x), o(x))
    o.eval()
    assert torch.equal(o(x), o(x))


# ------------------------------------------------------------------ tp=2 == tp=1
def _tp_worker(rank, world, sps):
    from megallama.mpu.sequence_parallel import allreduce_sequence_parallel_gradients
    ids, labels = batch(2)
    out = []
    for sp in sps:
        ps.initialize_model_parallel(world)
        m = _lora_model(sequence_parallel=sp)
        loss = m(ids, labels=labels).mean()
        loss.backward()
        allreduce_sequence_parallel_gradients(m)
        state = full_params_and_grads(m)
        adapters = gather_lora_state_dict([m])
        out.append((float(loss), state, {k: v.numpy() for k, v in adapters.items()}))
    return out


def test_lora_tp2_equals_tp1():
    ids, labels = batch(2)
    ref = _lora_model()
    loss = ref(ids, labels=labels).mean()
    loss.backward()
    ref_state = full_params_and_grads(ref)
    results = run_distributed(_tp_worker, 2, [False, True])
    for sp, (l, state, adapters) in zip([False, True], results[0]):
        assert abs(l - float(loss)) / float(loss) < 1e-5, (sp, l, float(loss))
        assert set(state) == set(ref_state)
        for k, v in ref_state.items():
            err = rel_err(torch.from_numpy(state[k]), torch.from_numpy(v))
            assert err < 1e-5, (sp, k, err)
        for k, v in adapters.items():
            assert rel_err(torch.from_numpy(v), torch.from_numpy(ref_state[k])) < 1e-6
    assert sum(k.endswith("lora_A.weight.grad") for k in ref_state) == 14


# ------------------------------------------------------------------ --save-adapter under ZeRO-3
def _zero3_adapter_worker(rank, world, path):
    from megallama.optimizer.distributed import DistributedDataParallel
    from megallama.strategies import save_adapter
    ps.initialize_model_parallel()  # dp 2
    ddp = DistributedDataParallel(_lora_model(), zero_stage=3)
    save_adapter(path, [ddp], lora_cfg=LoRAConfig(rank=4, alpha=8, target_modules=list(LORA_TARGETS)),
                 overwrite=False)
    return {n: tuple(p.shape) for n, p in ddp.module.named_parameters() if ".lora_" in n}


def test_save_adapter_under_zero3_writes_whole_adapters(tmp_path):
    """ZeRO-3 leaves each parameter an empty placeholder between uses: --save-adapter wrote 0-element tensors."""
    from safetensors.torch import load_file
    shapes = run_distributed(_zero3_adapter_worker, 2, str(tmp_path / "adapter"))[0]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    ref = gather_lora_state_dict([_lora_model()])
    assert len(saved) == len(ref) == 28
    for k, v in ref.items():
        assert torch.equal(saved["base_model.model." + k], v), k
    assert all(s == (0,) for s in shapes.values())  # the placeholders are left as the wrapper keeps them


def test_target_modules_take_peft_spacing_too():
    """PEFT users write --lora-target-modules q_proj v_proj (space separated); it was 'unrecognized arguments'."""
    from megallama.arguments import parse_args
    from megallama.strategies import strategy_from_args
    line = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--micro-batch-size", "1", "--strategy", "lora"]
    for spelling in (["q_proj", "v_proj"], ["q_proj,v_proj"], ["q_proj,", "v_proj"]):
        args = parse_args(line + ["--lora-target-modules"] + spelling, world_size=1)
        assert strategy_from_args(args).lora_config().target_modules == ["q_proj", "v_proj"], spelling
