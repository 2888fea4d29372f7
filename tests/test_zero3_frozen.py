"""ZeRO-3 shards frozen parameters too (a LoRA base, FSDP-style): each rank stores 1/dp of them and gathers them a
unit at a time with the adapters. LoRA under ZeRO-3 dp 2 equals one process (losses over steps, the adapters'
gradients), frees the base between uses, stores half the base per rank, and its checkpoints resume across layouts."""
import dataclasses
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimizer"))  # zero_harness
from dist_utils import rel_err, run_distributed  # noqa: E402
from loop_harness import assert_layout_matches_single_process  # noqa: E402
from megallama.model import build_model  # noqa: E402
from megallama.model.lora import LORA_TARGETS  # noqa: E402
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megallama.strategies import TrainingStrategy, apply_strategy  # noqa: E402
from zero_harness import CFG, OPT, SEED, batch, local_microbatches, train  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
STEPS = 4


def _lora_model():
    m = build_model(dataclasses.replace(CFG, num_layers=4), seed=SEED)
    apply_strategy([m], TrainingStrategy("lora", {"lora_rank": 4, "lora_alpha": 8,
                                                  "target_modules": list(LORA_TARGETS)}), seed=SEED)
    from megallama.mpu.random import init_parameter
    for n, p in m.named_parameters():  # B starts at zero: layout-independent values so the adapters matter
        if n.endswith("lora_B.weight"):
            with torch.no_grad():
                init_parameter(p, n, SEED + 1, 0.05)
    return m


def _make(**kw):
    ddp = DistributedDataParallel(_lora_model(), zero_stage=3, data_parallel_group=dist.group.WORLD, **kw)
    opt = get_megatron_optimizer(OptimizerConfig(**OPT, params_dtype=torch.float32), [ddp])
    return ddp, opt


def _frozen_bytes(ddp):
    """Bytes of the frozen base this rank keeps between steps: unique storages of the frozen params and shard."""
    st = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
          for p in ddp.module.parameters() if not p.requires_grad}
    if ddp.zero3.frozen is not None:
        s = ddp.zero3.frozen.shard.untyped_storage()
        st[s.data_ptr()] = s.nbytes()
    return sum(st.values())


def _adapter_grads_match(ddp):
    """After one synced backward, this rank's gradient pieces equal the full-batch gradients of a plain model."""
    ref = _lora_model()
    x, y = batch(0)
    ref(x, labels=y).mean().backward()
    grads = {n: p.grad.reshape(-1) for n, p in ref.named_parameters() if p.requires_grad}
    ddp.zero_grad_buffer()
    for xm, ym in local_microbatches(0, ddp.dp_size, ddp.dp_rank, 1):
        ddp(xm, labels=ym).mean().backward()
    ddp.finish_grad_sync()
    worst = 0.0
    for pc in ddp.optimizer_pieces():
        worst = max(worst, rel_err(pc.grad_view, grads[pc.name][pc.param_start:pc.param_end]))
    return worst


def _job(rank, world, ckpt):
    out = {}
    ddp, opt = _make()
    out["grad_err"] = _adapter_grads_match(ddp)
    ddp, opt = _make(overlap_grad_reduce=True, overlap_param_gather=True)
    out["frozen_bytes"] = _frozen_bytes(ddp)
    out["footprint"] = ddp.memory_footprint()["params"]
    refs = []
    for u in ddp.zero3.units:
        u.module.register_forward_pre_hook(
            lambda m, a, u=u: refs.extend(StorageWeakRef(pt.full.untyped_storage()) for pt in u.parts
                                          if pt.full is not None))
    losses, _ = train(ddp, opt, 0, STEPS // 2)
    out["gathered_after_step"] = [u.name for u in ddp.zero3.all_units if any(pt.full is not None for pt in u.parts)]
    x, y = batch(0)
    refs.clear()
    loss = ddp(x[:2], labels=y[:2]).mean()
    out["alive_after_forward"] = sum(not r.expired() for r in refs)
    z, gathers, live = ddp.zero3, [], [0]

    def spy(part, async_op=False):  # every gather in backward; how many units are gathered at once
        if part.full is None:
            gathers.append((part.unit.name, part.flat is z.frozen))
        z.__class__.gather_part(z, part, async_op)
        live[0] = max(live[0], sum(u.full is not None for u in z.all_units))
    z.gather_part = spy
    loss.backward()
    del z.gather_part
    out["backward_gathers"], out["backward_live_units"] = gathers, live[0]
    ddp.zero_grad_buffer()
    out["frozen_bytes_after"] = _frozen_bytes(ddp)
    torch.save(ddp.state_dict(), os.path.join(ckpt, f"model_{world}.pt"))
    torch.save(opt.gather_full_state_dict(), os.path.join(ckpt, f"optim_{world}.pt"))
    more, _ = train(ddp, opt, STEPS // 2, STEPS - STEPS // 2)
    out["losses"] = losses + more
    return out


def _resume(rank, world, ckpt, saved_world):
    ddp, opt = _make()
    ddp.load_state_dict(torch.load(os.path.join(ckpt, f"model_{saved_world}.pt"), weights_only=True))
    opt.load_state_dict(torch.load(os.path.join(ckpt, f"optim_{saved_world}.pt"), weights_only=True))
    losses, _ = train(ddp, opt, STEPS // 2, STEPS - STEPS // 2)
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("zero3_frozen"))
    return ckpt, run_distributed(_job, 1, ckpt)[0], run_distributed(_job, 2, ckpt)


def test_lora_zero3_dp2_matches_one_process(runs):
    _, one, two = runs
    for r in two.values():
        assert r["grad_err"] < 1e-5 and one["grad_err"] < 1e-5, (r["grad_err"], one["grad_err"])
        for a, b in zip(r["losses"], one["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (r["losses"], one["losses"])


def test_zero3_stores_half_the_frozen_base_per_rank_and_frees_it_after_use(runs):
    _, one, two = runs
    whole = sum(p.numel() * 4 for p in _lora_model().parameters() if not p.requires_grad)
    assert one["frozen_bytes"] == one["frozen_bytes_after"] == whole  # dp 1: one copy, in the shard buffer
    for r in two.values():
        assert abs(r["frozen_bytes"] / whole - 0.5) < 0.02 and r["frozen_bytes_after"] == r["frozen_bytes"]
        assert r["footprint"] < one["footprint"] * 0.52
        assert r["gathered_after_step"] == [] and r["alive_after_forward"] == 0
        # backward gathers each unit once (a frozen GEMM after the last adapter gradient regathered it, and every
        # layer then stayed gathered to the end of backward): the unit, the one prefetched, the root
        gathers = r["backward_gathers"]
        assert len(gathers) == len(set(gathers)) and ("model.layers.0", True) in gathers, gathers
        assert r["backward_live_units"] <= 3, r["backward_live_units"]


@pytest.mark.parametrize("saved,loaded", [(2, 1), (1, 2)])
def test_checkpoint_resumes_across_dp(runs, saved, loaded):
    ckpt, one, two = runs
    ref = (two[0] if saved == 2 else one)["losses"][STEPS // 2:]
    for losses in run_distributed(_resume, loaded, ckpt, saved).values():
        for a, b in zip(losses, ref):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, ref)


LOOP = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu", "--strategy", "lora",
        "--lora-rank", "4", "--lora-target-modules", "q_proj,v_proj,down_proj", "--zero-stage", "3"]


@pytest.mark.parametrize("world,extra", [(2, []), (4, ["--tensor-model-parallel-size", "2"]),
                                         (4, ["--context-parallel-size", "2"])], ids=["dp2", "tp2_dp2", "cp2_dp2"])
def test_lora_zero3_loop_matches_single_process(world, extra):
    assert_layout_matches_single_process(LOOP, world, extra)


def _generate(ckpt):
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "tools", "generate.py"), "--load", ckpt, "--device", "cpu",
                        "--prompt", "The module", "--max-new-tokens", "4", "--greedy"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=repo), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_loop_checkpoints_resume_across_dp_and_generate(tmp_path):
    """The loop's checkpoint of a LoRA run under ZeRO-3 dp 2 (the base gathered for the save) resumes in one
    process and the other way round, with the uninterrupted run's losses; generation reads it as any other."""
    from loop_harness import train_losses
    base = LOOP[:LOOP.index("--vocab-size")] + LOOP[LOOP.index("--vocab-size") + 2:]  # the tokenizer's vocabulary
    base[base.index("--train-iters") + 1] = "4"
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    ref2 = run_distributed(train_losses, 2, base + ["--save", two, "--save-interval", "2"])[0]
    ref1 = run_distributed(train_losses, 1, base + ["--save", one, "--save-interval", "2"])[0]
    for saved, ref, world in ((two, ref2, 1), (one, ref1, 2)):
        got = run_distributed(train_losses, world, base + ["--load", os.path.join(saved, "iter_0000002")])[0]
        assert sorted(got) == [3, 4], got
        for step in (3, 4):
            assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (saved, got, ref)
    out = _generate(os.path.join(two, "iter_0000004"))
    assert out.count("--- prompt:") == 1 and "iteration 4" in out, out


def test_startup_line_counts_the_frozen_base_in_the_shard():
    """``--dry-run`` on 2 ranks: rank 0 stores about half of a LoRA stage (it said the whole frozen base)."""
    from test_startup_lines import TINY, _count, _line, _said_on_rank
    argv = TINY + ["--global-batch-size", "2", "--zero-stage", "3", "--dry-run", "--strategy", "lora"]
    line = _line(run_distributed(_said_on_rank, 2, argv)[0], "global rank 0 stores ")
    stored, total = line.split(" stores ", 1)[1].split(" parameters (its ZeRO-3 shard of the ")
    assert abs(_count(stored) / _count(total.split(" ", 1)[0]) - 0.5) < 0.01, line


HYBRID = LOOP[:LOOP.index("--strategy")] + ["--strategy", "hybrid", "--num-experts", "4", "--lora-rank", "4",
                                            "--zero-stage", "3"]


def test_hybrid_zero3_with_expert_parallelism_matches_single_process():
    """LoRA with experts trains the MoE layers whole (hybrid): the frozen dense base shards over dp, the trained
    experts over the expert-data-parallel group, as before."""
    assert_layout_matches_single_process(HYBRID, 2, ["--expert-model-parallel-size", "2"])
