"""Megatron's MoE flags under parallel layouts (CPU, gloo, fp32/fp64 router): dp2, ep2, tp2 (with and without
sequence parallelism) and cp2 against one process running the same micro-batches, losses and every gradient
within 1e-5; a shared expert saved under tp2 loads into one process and back, exactly.

* shared expert + softmax-before-top-k + top-k scaling + capacity (probs, padded) + seq_aux_loss, and shared
  expert + sigmoid + fp64 router + capacity (position): every layout equals one process (capacity counts the
  micro-batch's tokens, gathered over tp, so tp does not move drops; cp would: it is left out for capacity).
* global_aux_loss: tp2 (SP or not) and cp2 equal one process; dp2 and ep2 (ep ranks are dp ranks) equal one
  process whose micro-batch j joins both ranks' j-th micro-batches, at half the coefficient (Megatron's
  definition: the joint loss's per-rank shares are averaged over dp like every gradient)."""
import torch

from dist_utils import rel_err, run_distributed
from megallama.model import build_model
from megallama.model.moe import set_aux_loss_scale
from megallama.mpu import parallel_state as ps
from megallama.mpu.context_parallel import cp_mean_loss, get_batch_on_this_cp_rank
from megallama.strategies import TrainingStrategy, apply_strategy
from strat_helpers import TINY, full_tensor, reduce_like_ddp

BASE = {"num_experts": 4, "experts_per_token": 2, "moe_z_loss_coeff": 1e-2, "moe_shared_expert_intermediate_size": 32}
CONFIGS = {
    "softmax": dict(BASE, moe_aux_loss_coeff=1.0, moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.0,
                    moe_expert_capacity_factor=0.75, moe_pad_expert_input_to_capacity=True,
                    moe_router_load_balancing_type="seq_aux_loss"),
    "sigmoid": dict(BASE, moe_aux_loss_coeff=1.0, moe_router_score_function="sigmoid", moe_router_dtype="fp64",
                    moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"),
    "global": dict(BASE, moe_aux_loss_coeff=1.0, moe_router_load_balancing_type="global_aux_loss"),
    "global_half": dict(BASE, moe_aux_loss_coeff=0.5, moe_router_load_balancing_type="global_aux_loss"),
}
GLOBAL_BATCH, MBS, SEQ, SEED = 8, 2, 16, 7


def _model(params, sequence_parallel=False):
    m = build_model(TINY, seed=SEED, sequence_parallel=sequence_parallel)
    apply_strategy([m], TrainingStrategy("moe", dict(params)), seed=SEED)
    return m


def _microbatches(mbs):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    b = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
         "loss_mask": (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.2).float()}
    return [{k: v[i * mbs:(i + 1) * mbs] for k, v in b.items()} for i in range(GLOBAL_BATCH // mbs)]


def _joined_loss(model, b):
    """A dp-joined micro-batch's LM loss as the dp ranks see it: the mean of its two halves' masked means."""
    tok = model(b["input_ids"], labels=b["labels"])
    halves = [(tok[h::2] * b["loss_mask"][h::2]).sum() / b["loss_mask"][h::2].sum() for h in (0, 1)]
    return (halves[0] + halves[1]) / 2


def _step(model, microbatches, joined=False):
    """Megatron's schedule: each micro-batch's loss / count backward, aux scale 1 / count (a new step)."""
    set_aux_loss_scale(1.0 / len(microbatches))
    total = torch.zeros(())
    for b in microbatches:
        b = get_batch_on_this_cp_rank(b)
        loss = _joined_loss(model, b) if joined else \
            cp_mean_loss(model(b["input_ids"], labels=b["labels"], loss_mask=b["loss_mask"]), b["loss_mask"])
        (loss / len(microbatches)).backward()
        total += loss.detach() / len(microbatches)
    return total


def _layouts_worker(rank, world, jobs):
    out = []
    for name, (tp, cp, ep, sp) in jobs:
        ps.initialize_model_parallel(tp, 1, context_parallel_size=cp, expert_model_parallel_size=ep)
        m = _model(CONFIGS[name], sequence_parallel=sp)
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mb = _microbatches(MBS)
        per = len(mb) // dp
        loss = _step(m, mb[r * per:(r + 1) * per])
        out.append(reduce_like_ddp(m, loss, ep))
        ps.destroy_model_parallel()
    return out


def _check(got, want, what):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (what, loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        err = rel_err(torch.from_numpy(g), torch.from_numpy(ref_grads[n]))
        assert err < 1e-5, (what, n, err)
    assert any("shared_experts.down_proj" in n for n in ref_grads) and any("router" in n for n in ref_grads)


DP2, EP2, TP2SP, TP2, CP2 = (1, 1, 1, False), (1, 1, 2, False), (2, 1, 1, True), (2, 1, 1, False), (1, 2, 1, False)
M = GLOBAL_BATCH // MBS
# (config, layout, reference job): the same micro-batches, or for global under dp/ep the joined ones at coeff/2
CASES = [("softmax", l, ("softmax", MBS, range(M))) for l in (DP2, EP2, TP2SP, TP2)] + \
        [("sigmoid", l, ("sigmoid", MBS, range(M))) for l in (DP2, EP2, TP2SP)] + \
        [("global", l, ("global", MBS, range(M))) for l in (TP2SP, TP2, CP2)] + \
        [("global", l, ("global_half", 2 * MBS, None)) for l in (DP2, EP2)]


def test_megatron_moe_flags_under_dp_ep_tp_cp_equal_one_process():
    # dp2 with 4 micro-batches: rank r runs [2r, 2r+1]; joined micro-batch j = rank 0's j-th + rank 1's j-th
    joined = [torch.tensor([j, M // 2 + j]) for j in range(M // 2)]
    jobs, refs = [], []
    for name, layout, (ref_name, mbs, order) in CASES:
        jobs.append((name, layout))
        refs.append((ref_name, mbs, order))
    ref_jobs = sorted({(n, mbs, tuple(o) if o is not None else None) for n, mbs, o in refs}, key=str)
    ref_out = dict(zip(ref_jobs, run_distributed(_joined_reference_worker, 1, ref_jobs, joined)[0]))
    results = run_distributed(_layouts_worker, 2, jobs)[0]
    for (name, layout), (n, mbs, o), got in zip(jobs, refs, results):
        _check(got, ref_out[(n, mbs, tuple(o) if o is not None else None)], (name, layout))


def _joined_reference_worker(rank, world, jobs, joined):
    """_reference_worker, where order None means the dp-joined micro-batches (each of 2 x MBS samples)."""
    out = []
    for name, mbs, order in jobs:
        m = _model(CONFIGS[name])
        if order is None:
            small = _microbatches(MBS)
            # interleaved samples (rank 0's, rank 1's, ...) so that the halves are [0::2] and [1::2]
            mb = [{k: torch.stack([small[int(i)][k] for i in pair], 1).flatten(0, 1) for k in small[0]}
                  for pair in joined]
        else:
            mb = [_microbatches(mbs)[i] for i in order]
        loss = _step(m, mb, joined=order is None)
        out.append((float(loss), {n: p.grad.numpy() for n, p in m.named_parameters()}))
    return out


# ------------------------------------------------------------------ checkpoints reshard the shared expert
def _ckpt_worker(rank, world, save_dir, single_dir):
    from types import SimpleNamespace
    from megallama.checkpointing import load_checkpoint, save_checkpoint
    from megallama.errors import ConfigError
    ps.initialize_model_parallel(2, 1)
    try:
        _model(dict(BASE, moe_shared_expert_intermediate_size=33))
        odd = None
    except ConfigError as e:
        odd = str(e)
    m = _model(CONFIGS["global"], sequence_parallel=True)
    args = SimpleNamespace(model="moe", model_config=m.config)
    save_checkpoint(save_dir, 1, [m], None, args, consumed_samples=0)
    mine = {k: v.clone() for k, v in m.state_dict().items()}
    fresh = build_model(TINY, seed=99, sequence_parallel=True)
    apply_strategy([fresh], TrainingStrategy("moe", dict(CONFIGS["global"])), seed=99)
    load_checkpoint(single_dir, [fresh], None, args)
    same = all(torch.equal(mine[k], v) for k, v in fresh.state_dict().items())
    sharded = mine["model.layers.0.mlp.shared_experts.gate_proj.weight"].shape[0] == 16
    return same and sharded, odd


def test_shared_expert_checkpoint_reshards_tp2_and_one_process(tmp_path):
    from types import SimpleNamespace
    from megallama.checkpointing import load_checkpoint, open_checkpoint, save_checkpoint
    ref = _model(CONFIGS["global"])
    args = SimpleNamespace(model="moe", model_config=ref.config)
    single = str(tmp_path / "single")
    save_checkpoint(single, 1, [ref], None, args, consumed_samples=0)
    results = run_distributed(_ckpt_worker, 2, str(tmp_path / "tp2"), single)
    assert all(ok for ok, _ in results.values()), results
    assert "--moe-shared-expert-intermediate-size 33 is not divisible by the tensor-parallel size 2" in results[0][1]
    _, common, reader = open_checkpoint(str(tmp_path / "tp2"))
    sd = ref.state_dict()
    assert sorted(common["index"]) == sorted(sd) and any("shared_experts" in n for n in sd)
    for name, t in sd.items():
        assert torch.equal(reader.read(name), t), name
    fresh = build_model(TINY, seed=99)
    apply_strategy([fresh], TrainingStrategy("moe", dict(CONFIGS["global"])), seed=99)
    load_checkpoint(str(tmp_path / "tp2"), [fresh], None, args)
    assert all(torch.equal(t, sd[n]) for n, t in fresh.state_dict().items())
