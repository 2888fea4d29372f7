"""--recompute-modules (Megatron's selective recompute by submodule): gradients with each module recomputed equal
those without, bit for bit or to 1e-6, on one process (dense and MoE with a gated shared expert), at tp 2 with
sequence parallelism and at ep 2 (gloo ranks); output-discarding (layernorm, moe_act) really frees the outputs;
the one-line errors."""
import pytest
import torch

from dist_utils import rel_err, run_distributed
from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.model.moe import set_aux_loss_scale
from megallama.model.recompute import RECOMPUTE_MODULES, apply_selective_recompute, check_recompute_modules
from megallama.mpu import parallel_state as ps
from megallama.strategies import TrainingStrategy, apply_strategy
from strategies.strat_helpers import TINY, batch, reduce_like_ddp

MOE = {"num_experts": 4, "experts_per_token": 2, "moe_shared_expert_intermediate_size": 32,
       "moe_shared_expert_gate": True, "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3, "moe_layer_freq": 2}
OURS = [m for m in RECOMPUTE_MODULES if m != "mla_up_proj"]
SETS = [None] + [[m] for m in OURS] + [OURS]  # None: megallama's default selective (norms + dense SwiGLU)


def _model(moe, sp=False):
    m = build_model(TINY, seed=3, sequence_parallel=sp)
    if moe:
        apply_strategy([m], TrainingStrategy("moe", dict(MOE)), seed=3)
    return m


def _grads(moe, modules, recompute=True, sp=False, ep=1):
    m = _model(moe, sp)
    if recompute:
        apply_selective_recompute(m, modules)
    set_aux_loss_scale(0.5)
    total = torch.zeros(())
    for i in range(2):
        ids, labels = batch(2, seed=i + 10 * ps.get_data_parallel_rank())
        loss = m(ids, labels=labels).mean()
        (loss / 2).backward()
        total += loss.detach() / 2
    return reduce_like_ddp(m, total, ep)


def _same(got, want, what, tol=1e-6):
    (loss, grads), (ref_loss, ref) = got, want
    assert loss == pytest.approx(ref_loss, rel=tol, abs=0), what
    assert set(grads) == set(ref), what
    for n, g in grads.items():
        assert rel_err(torch.from_numpy(g), torch.from_numpy(ref[n])) <= tol, (what, n)


def _one(rank, world):
    out = {}
    for moe in (False, True):
        out[moe, "none"] = _grads(moe, None, recompute=False)
        for mods in SETS:
            out[moe, str(mods)] = _grads(moe, mods)
    return out


def test_every_module_gives_the_gradients_of_no_recompute_on_one_process():
    out = run_distributed(_one, 1)[0]
    for moe in (False, True):
        for mods in SETS:
            _same(out[moe, str(mods)], out[moe, "none"], (moe, mods))


def _layouts(rank, world):
    out = {}
    for name, tp, ep, sp in (("tp2_sp", 2, 1, True), ("ep2", 1, 2, False)):
        ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        out[name, "none"] = _grads(True, None, recompute=False, sp=sp, ep=ep)
        out[name, "all"] = _grads(True, OURS, sp=sp, ep=ep)
        if tp > 1:
            out[name, "dense"] = _grads(False, OURS, sp=sp, ep=ep)
            out[name, "dense_none"] = _grads(False, None, recompute=False, sp=sp, ep=ep)
        ps.destroy_model_parallel()
    return out


def test_tp2_sp_and_ep2_with_every_module_recomputed_equal_no_recompute():
    out = run_distributed(_layouts, 2)[0]
    _same(out["tp2_sp", "all"], out["tp2_sp", "none"], "tp2 + SP, MoE")
    _same(out["tp2_sp", "dense"], out["tp2_sp", "dense_none"], "tp2 + SP, dense")
    _same(out["ep2", "all"], out["ep2", "none"], "ep2")


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd holds after the forward (outputs emptied by discarding count 0)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).mean()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    loss.backward()  # the discarded outputs come back for the backward
    return sum(storages.values())


@pytest.mark.parametrize("module, moe", [("layernorm", False), ("moe_act", True)])
def test_output_discarding_frees_what_the_consumer_saved(module, moe):
    ids, _ = batch(2)
    keep = _model(moe)
    apply_selective_recompute(keep, [])  # selective, nothing recomputed
    drop = _model(moe)
    apply_selective_recompute(drop, [module])
    assert _saved_bytes(drop, ids) < _saved_bytes(keep, ids)


def test_the_default_is_megallamas_selective_and_core_attn_alone_is_megatrons():
    m = _model(True)
    apply_selective_recompute(m, None)
    layer = m.model.layers["1"]
    assert layer.recompute_norm and layer.mlp.recompute_activation and not layer.recompute_mlp
    m = _model(True)
    apply_selective_recompute(m, ["core_attn"])
    assert m.model.layers["0"].self_attn.recompute_core_attention and not m.model.layers["0"].recompute_norm
    assert not m.model.layers["0"].discard_norm_output and not m.model.layers["0"].mlp.experts.recompute_activation


@pytest.mark.parametrize("granularity, modules, message", [
    ("selective", ["mla_up_proj"], "megallama has no MLA; drop mla_up_proj"),
    ("selective", ["attn"], "--recompute-modules attn is not one of core_attn, moe_act"),
    ("full", ["core_attn"], "--recompute-modules selects what --recompute-granularity selective recomputes"),
    (None, ["mlp"], "add --recompute-granularity selective or drop --recompute-modules"),
])
def test_bad_modules_are_one_error_line(granularity, modules, message):
    with pytest.raises(ConfigError, match=message):
        check_recompute_modules(granularity, modules)
    assert check_recompute_modules("selective", ["mlp", "moe", "mlp"]) == ("mlp", "moe")
    assert check_recompute_modules("selective", None) is None


def test_the_args_check_normalises_and_refuses_discarding_under_compile():
    from types import SimpleNamespace
    from megallama.model.recompute import check_recompute_modules_args
    args = SimpleNamespace(recompute_granularity="selective", recompute_modules=["moe", "moe"], compile=True)
    check_recompute_modules_args(args)
    assert args.recompute_modules == ("moe",)
    with pytest.raises(ConfigError, match="--recompute-modules layernorm .* is not supported with --compile"):
        check_recompute_modules_args(SimpleNamespace(recompute_granularity="selective", recompute_modules=["layernorm"],
                                                     compile=True))
