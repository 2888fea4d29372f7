"""fp16 overflow is a world-wide decision (Megatron's found_inf, all-reduced with MAX): an inf in one rank's
gradient must skip the step on every rank and back the dynamic loss scale off identically, at every ZeRO stage
and under tp 2 / pp 2 / ep 2, wherever the inf sits -- also in a piece the grad norm does not count on that rank
(a norm weight on tp rank 1, the tied output copy on the last stage, a dp-replicated grad at stage 0, an expert).
A skipped step changes no state: masters, model params, Adam moments and step count stay as they were.
4 gloo ranks; gradients are written into the buffers directly (the optimizer does not care how they got there)."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megallama.mpu import parallel_state as ps
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megallama.pipeline import build_model_chunks
from megallama.strategies import TrainingStrategy, apply_strategy
from zero_harness import CFG, OPT, SEED

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
LAYOUTS = [("tp2", 0), ("tp2", 1), ("tp2", 2), ("tp2", 3), ("pp2", 0), ("pp2", 1), ("pp2", 3), ("ep2", 2),
           ("tp2-bf16", 1), ("pp2-bf16", 3)]  # bf16: no scaler, but the skip must be as global
SCALE = 1024.0


def _chunks(layout, dtype):
    if layout == "tp2":
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
        return build_model_chunks(CFG, seed=SEED, dtype=dtype)
    if layout == "pp2":
        ps.initialize_model_parallel(pipeline_model_parallel_size=2)
        return build_model_chunks(CFG.replace(num_layers=4, tie_word_embeddings=True), seed=SEED,
                                  dtype=dtype)
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    chunks = build_model_chunks(CFG, seed=SEED, dtype=dtype)
    apply_strategy(chunks, TrainingStrategy("moe", {"num_experts": 4, "experts_per_token": 2}), seed=SEED)
    return chunks


def _snapshot(opt):
    st = [(pc.master.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in
                               opt.optimizer.state.get(pc.master, {}).items()}) for pc in opt.pieces]
    return st, [pc.model_view.clone() for pc in opt.pieces], opt.num_steps


def _same(a, b) -> bool:
    (sa, ma, na), (sb, mb, nb) = a, b
    if na != nb or any(not torch.equal(x, y) for x, y in zip(ma, mb)):
        return False
    for (ta, da), (tb, db) in zip(sa, sb):
        if not torch.equal(ta, tb) or da.keys() != db.keys():
            return False
        if any(not torch.equal(torch.as_tensor(da[k]), torch.as_tensor(db[k])) for k in da):
            return False
    return True


def _fill(opt, value):
    for pc in opt.pieces:
        pc.grad_view.fill_(value)


def _run(layout, stage):
    layout, _, prec = layout.partition("-")
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    ddps = [DistributedDataParallel(c, zero_stage=stage, bucket_size=3000) for c in _chunks(layout, dtype)]
    cfg = OptimizerConfig(**OPT, fp16=prec != "bf16", bf16=prec == "bf16", params_dtype=dtype,
                          initial_loss_scale=SCALE, hysteresis=1, loss_scale_window=100)
    opt = get_megatron_optimizer(cfg, ddps)
    rank = dist.get_rank()
    _fill(opt, 1e-3 * float(opt.get_loss_scale()))  # a clean step first: "state unchanged" then covers Adam's
    assert opt.step()[0]
    out = []
    for culprit in range(dist.get_world_size()):
        for kind in ("uncounted", "counted"):
            _fill(opt, 1e-3 * float(opt.get_loss_scale()))
            counted = {id(pc) for pc in opt._norm_pieces()}
            targets = [pc for pc in opt.pieces if (id(pc) in counted) == (kind == "counted")]
            if rank == culprit and targets:
                targets[len(targets) // 2].grad_view[0] = float("inf")
            injected = torch.tensor([float(rank == culprit and bool(targets))])
            dist.all_reduce(injected)
            before, scale = _snapshot(opt), float(opt.get_loss_scale())
            ok = opt.step()[0]
            out.append(dict(culprit=culprit, kind=kind, injected=bool(injected.item()), ok=ok, scale=scale,
                            after=float(opt.get_loss_scale()), unchanged=_same(before, _snapshot(opt))))
    ps.destroy_model_parallel()
    return out


def _job(rank, world):
    return {case: _run(*case) for case in LAYOUTS}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, 4)


@pytest.mark.parametrize("layout,stage", LAYOUTS)
def test_one_rank_inf_skips_everywhere(results, layout, stage):
    runs = [results[r][(layout, stage)] for r in range(4)]
    for events in zip(*runs):
        e = events[0]
        what = f"{layout} ZeRO-{stage}: inf in a {e['kind']} piece of rank {e['culprit']}"
        assert all(x["ok"] == e["ok"] and x["after"] == e["after"] for x in events), f"{what}: ranks disagree: " \
            f"{[(x['ok'], x['after']) for x in events]}"
        if e["injected"]:
            assert not e["ok"], f"{what}: the step was not skipped"
            halved = e["scale"] / 2 if "bf16" not in layout else e["scale"]
            assert e["after"] == halved, f"{what}: scale {e['scale']} -> {e['after']}, not halved"
            bad = [r for r, x in enumerate(events) if not x["unchanged"]]
            assert not bad, f"{what}: the skipped step changed state on ranks {bad}"
        else:
            assert e["ok"] and e["after"] == e["scale"], f"{what}: a clean step was skipped or changed the scale"
