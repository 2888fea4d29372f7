"""Tensor parallelism (tp=2, tp=4), sequence parallelism and tp x dp = 2 x 2 train exactly like one process.

Each layout runs several AdamW steps (torch.optim on the local shards: elementwise, so sharding commutes with it)
on a tiny Llama in fp32 and is held, step by step, to the single-process run: losses within 1e-5 relative, the
full (tp-gathered) gradients of every parameter within 1e-5 in relative norm on every rank, and the final weights.
Both loss paths are covered: per-token losses from the vocab-parallel CE (labels with ignored positions) and the
fused head + CE with a loss mask (what the training loop uses). Under SP the loop's one extra call,
``allreduce_sequence_parallel_gradients``, is made after backward; the dp gradient average is done by hand here.
Adam's eps is 1e-6, not 1e-8: with 1e-8 a gradient element near zero (|g| ~ 1e-9, below fp32 reduction-order
noise) gets a +-lr step of random sign, which alone moves later gradients by ~5e-6 (measured: step-0 gradients
agree to 4e-7, steps 1-2 drift to 6e-6 with 1e-8 and stay under 1e-6 with 1e-6).
"""
import pytest
import torch
import torch.distributed as dist

from dist_utils import rel_err, run_distributed
from megallama.model import build_model
from megallama.mpu import allreduce_sequence_parallel_gradients
from megallama.mpu import parallel_state as ps
from tp_helpers import GQA_TIED, MHA, full_tensor

STEPS, BATCH, SEQ, SEED, TOL = 3, 4, 16, 5, 1e-5
PATHS = ("per_token", "fused")


def _batch(step, cfg):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.25).float()
    return ids, labels, mask


def _train(cfg, sequence_parallel, path):
    """Losses, full grads per step and final full weights of this rank's run (the same code for tp=1)."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model = build_model(cfg, seed=SEED, sequence_parallel=sequence_parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-6)
    losses, grads = [], []
    for step in range(STEPS):
        ids, labels, mask = (t.chunk(dp)[dp_rank] for t in _batch(step, cfg))
        if path == "per_token":
            loss = model(ids, labels=labels).sum() / labels.numel()
        else:
            loss = model(ids, labels=labels, loss_mask=mask) / mask.numel()
        loss.backward()
        allreduce_sequence_parallel_gradients(model)
        loss = loss.detach()
        if dp > 1:
            group = ps.get_data_parallel_group()
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
                p.grad /= dp
            dist.all_reduce(loss, group=group)
            loss /= dp
        losses.append(loss.item())
        grads.append({n: full_tensor(p, p.grad) for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {n: full_tensor(p) for n, p in model.named_parameters()}
    return losses, grads, weights


def _compare(got, ref, tag):
    (losses, grads, weights), (ref_losses, ref_grads, ref_weights) = got, ref
    errors, worst = [], 0.0
    for step, (l, rl) in enumerate(zip(losses, ref_losses)):
        e = abs(l - rl) / abs(rl)
        worst = max(worst, e)
        if e > TOL:
            errors.append(f"{tag} step {step}: loss {l} vs {rl}")
    for step, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert set(g) == set(rg)
        for name in rg:
            e = rel_err(g[name], rg[name])
            worst = max(worst, e)
            if e > TOL:
                errors.append(f"{tag} step {step}: grad {name} rel err {e:.2e}")
    for name in ref_weights:
        e = rel_err(weights[name], ref_weights[name])
        if e > TOL:
            errors.append(f"{tag}: final weight {name} rel err {e:.2e}")
    return errors, worst


def _job(rank, world, layouts, refs):
    """Runs every (tp, cfg name, sp, path) layout in this world; returns (errors, worst relative error)."""
    errors, worst = [], {}
    for tp, cfg_name, sp in layouts:
        ps.initialize_model_parallel(tp)
        cfg = CONFIGS[cfg_name]
        for path in PATHS:
            tag = f"rank {rank} tp={tp} dp={world // tp} {cfg_name} sp={sp} {path}"
            e, w = _compare(_train(cfg, sp, path), refs[(cfg_name, path)], tag)
            errors += e
            worst[(tp, cfg_name, sp, path)] = w
        ps.destroy_model_parallel()
    return errors, worst


CONFIGS = {"mha": MHA, "gqa_tied": GQA_TIED}


@pytest.fixture(scope="module")
def refs():
    torch.manual_seed(0)
    return {(name, path): _train(cfg, False, path) for name, cfg in CONFIGS.items() for path in PATHS}


def _run(world, layouts, refs):
    out = run_distributed(_job, world, layouts, refs)
    errors = [e for r in sorted(out) for e in out[r][0]]
    assert not errors, "\n".join(errors[:20])
    worst = max(w for r in out for w in out[r][1].values())
    print("worst relative error:", {k: f"{w:.1e}" for k, w in out[0][1].items()}, f"(all ranks {worst:.1e})")


def test_tp2_with_and_without_sequence_parallel(refs):
    _run(2, [(2, "gqa_tied", False), (2, "gqa_tied", True)], refs)


def test_tp4_and_tp2_dp2_with_and_without_sequence_parallel(refs):
    _run(4, [(4, "mha", False), (4, "mha", True), (2, "gqa_tied", False), (2, "gqa_tied", True)], refs)


def test_single_process_reference_actually_trains(refs):
    """Guards the oracle: the steps move the weights well beyond the tolerance, so matching losses and gradients
    after step 0 and the final weights check the updates too."""
    init = build_model(MHA, seed=SEED)
    _, _, weights = refs[("mha", "fused")]
    for name, p in init.named_parameters():
        assert rel_err(weights[name], p) > 1e-3, name
    for losses, _, _ in refs.values():
        assert len(set(losses)) == STEPS
