"""The estimator prices Megatron's --recompute-modules (activation_memory.modules_saved): the bytes autograd keeps
after the forward of a tiny dense and MoE model on CPU equal the formula for each module set (outputs emptied by
output-discarding count 0), and the estimate moves the right way: fewer bytes for every module that frees
something, none saved by naming nothing, megallama's default selective unchanged."""
import pytest
import torch

from megallama import activation_memory as am
from megallama.activation_memory import Numerics, Shape
from megallama.memory import estimate_requirements
from megallama.model.recompute import apply_selective_recompute

from test_memory import CFG, KERNELS, NUMERICS, _autocast, fused_kernels
from test_memory_features import MOE_CASES, _moe_model, _moe_shape

DENSE_SETS = [[], ["layernorm"], ["core_attn"], ["mlp"], ["layernorm", "core_attn", "mlp"]]
MOE_SETS = [["layernorm"], ["moe"], ["moe_act"], ["shared_experts"], ["layernorm", "moe_act", "shared_experts"],
            ["layernorm", "moe"]]


def _kept_after_forward(m, b=2, s=16):
    """Distinct non-parameter storages autograd saved, sized after the forward (a discarded output is 0 bytes)."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t
    torch.manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(ids, labels=ids, loss_mask=torch.ones(b, s))
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(v for k, v in sizes.items() if k not in params)


def _expected(x, num, mods, moe=None):
    base = moe.layer_saved(x, num, "none") if moe is not None else am.layer_saved(x, num, "none")
    per_layer = sum(am.modules_saved(base, x, num, mods, moe).values())
    return CFG.num_layers * per_layer + am.rope_tables(x) + am.embedding_saved(x) + sum(am.head_saved(x, num).values())


@pytest.mark.parametrize("fused", KERNELS)
def test_kept_bytes_equal_the_formula_for_each_module_set(fused):
    x = Shape.of(CFG, 2, 16)
    with fused_kernels(fused):
        for prec, mode in NUMERICS:
            num = Numerics.of(prec, mode, fused)
            for mods in DENSE_SETS:
                m = _dense(prec, mode)
                apply_selective_recompute(m, mods)
                with _autocast(prec, mode):
                    got = _kept_after_forward(m)
                assert got == _expected(x, num, mods), (prec, mode, mods)
            for name, params in (MOE_CASES[1], MOE_CASES[4]):  # shared expert; padded to capacity
                moe = _moe_shape(CFG, params)
                for mods in MOE_SETS:
                    m = _moe_model(CFG, prec, mode, "none", params)
                    apply_selective_recompute(m, mods)
                    with _autocast(prec, mode):
                        got = _kept_after_forward(m)
                    assert got == _expected(x, num, mods, moe), (name, prec, mode, mods)


def _dense(prec, mode):
    from test_memory import _model
    return _model(CFG, prec, mode, "none")


def _activations(mods, moe=True, **kw):
    base = dict(model_config=CFG.replace(num_layers=4), batch_size=2, sequence_length=64, recompute="selective",
                recommend=False, device="cpu")
    if moe:
        base.update(strategy="moe", num_experts=4, moe_topk=2, moe_shared_expert_intermediate_size=64)
    r = estimate_requirements("tiny", recompute_modules=mods, **dict(base, **kw))
    return r["breakdown_bytes"]["activations"], r["layout"]["recompute_modules"]


def test_the_estimate_falls_with_each_module_that_frees_something():
    nothing, listed = _activations([])
    assert listed == []
    for mod in ("layernorm", "core_attn", "moe", "moe_act", "shared_experts"):
        assert _activations([mod])[0] < nothing, mod
    assert _activations(["moe"])[0] < _activations(["moe_act"])[0]
    assert _activations(["layernorm", "moe"])[0] < _activations(["moe"])[0]
    dense_nothing = _activations([], moe=False)[0]
    assert _activations(["mlp"], moe=False)[0] < dense_nothing
    assert _activations(["moe"], moe=False)[0] == dense_nothing  # no MoE layer: nothing to recompute
    assert _activations(["core_attn", "moe"], recompute="full")[0] == _activations(None, recompute="full")[0]


def test_default_selective_is_unchanged_and_the_flag_reaches_the_estimate():
    from megallama.arguments import parse_args
    from megallama.memory_args import estimate_for_args
    assert _activations(None)[0] == estimate_requirements(
        "tiny", model_config=CFG.replace(num_layers=4), batch_size=2, sequence_length=64, recompute="selective",
        recommend=False, device="cpu", strategy="moe", num_experts=4, moe_topk=2,
        moe_shared_expert_intermediate_size=64)["breakdown_bytes"]["activations"]
    line = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--seq-length", "64", "--micro-batch-size", "1",
            "--recompute-granularity", "selective"]
    plain = estimate_for_args(parse_args(line), 1, recommend=False)
    mlp = estimate_for_args(parse_args(line + ["--recompute-modules", "mlp"]), 1, recommend=False)
    assert mlp["layout"]["recompute_modules"] == ["mlp"]
    assert mlp["breakdown_bytes"]["activations"] < plain["breakdown_bytes"]["activations"]


def test_estimate_memory_cli_takes_recompute_modules(capsys):
    """tools/estimate_memory.py prices --recompute-modules as training does (it ignored the flag: unknown)."""
    import json
    from megallama.memory_cli import main
    base = ["--model", "llama3_2_1b", "--batch-size", "4", "--seq-length", "2048", "--recompute-granularity",
            "selective", "--json"]
    got = {}
    for mods in ([], ["--recompute-modules", "layernorm", "mlp"]):
        assert main(base + mods) == 0
        got[bool(mods)] = json.loads(capsys.readouterr().out)
    assert got[True]["layout"]["recompute_modules"] == ["layernorm", "mlp"]
    assert got[True]["peak_allocated_gb"] < 0.85 * got[False]["peak_allocated_gb"]
    assert main(["--model", "llama3_2_1b", "--recompute-modules", "mlp"]) != 0
    assert "add --recompute-granularity selective" in capsys.readouterr().err
