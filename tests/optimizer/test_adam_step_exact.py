"""One optimizer step against torch.optim.AdamW on the same parameters and gradients, at every ZeRO stage (one
process): bias correction, eps outside the square root, decoupled weight decay times the LR, no decay for 1-D
parameters, Megatron's clipping coefficient max / (norm + 1e-6) and --clip-grad 0 = no clipping. eps = 1 makes the
update depend on the gradient's scale, so that clipping (or its absence) shows in the parameters."""
import pytest
import torch

from megallama.model import build_model
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from zero_harness import CFG, SEED, batch

HYPER = dict(lr=1e-2, weight_decay=0.3, adam_beta1=0.8, adam_beta2=0.9)


def _one_step(stage: int, clip: float, eps: float):
    """(params before, their gradients, params after) of one step of megallama's optimizer, by parameter name."""
    model = build_model(CFG, seed=SEED)
    ddp = DistributedDataParallel(model, zero_stage=stage, bucket_size=3000)
    opt = get_megatron_optimizer(OptimizerConfig(**HYPER, adam_eps=eps, clip_grad=clip), [ddp])
    before = {k: v.clone() for k, v in ddp.state_dict().items()}
    opt.zero_grad()
    x, y = batch(0)
    ddp(x, labels=y).mean().backward()
    ddp.finish_grad_sync()
    grads = {pc.name: pc.grad_view.detach().clone().view(pc.shape) for pc in opt.pieces}
    ok, norm, _ = opt.step()
    assert ok
    return before, grads, norm, ddp.state_dict()


def _torch_adamw(before, grads, eps, coef=1.0, foreach=True):
    params = {k: before[k].clone().requires_grad_(True) for k in grads}
    for k, p in params.items():
        p.grad = grads[k] * coef if coef != 1.0 else grads[k].clone()
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": HYPER["weight_decay"]},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=HYPER["lr"], betas=(HYPER["adam_beta1"], HYPER["adam_beta2"]), eps=eps,
                            foreach=foreach)
    opt.step()
    return {k: p.detach() for k, p in params.items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_step_equals_torch_adamw(stage):
    before, grads, _, after = _one_step(stage, clip=0.0, eps=1e-8)
    same_kernel = _torch_adamw(before, grads, 1e-8, foreach=True)
    single_tensor = _torch_adamw(before, grads, 1e-8, foreach=False)
    assert len(grads) == len(list(build_model(CFG, seed=SEED).parameters()))
    for k in grads:
        assert torch.equal(after[k], same_kernel[k]), k  # the same update, to the bit
        torch.testing.assert_close(after[k], single_tensor[k], rtol=1e-7, atol=0)
        assert not torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("stage", [0, 3])
def test_clip_grad_zero_turns_clipping_off_and_positive_clips_by_megatrons_coefficient(stage):
    before, grads, norm, unclipped = _one_step(stage, clip=0.0, eps=1.0)
    exact = float(torch.stack([g.double().square().sum() for g in grads.values()]).sum().sqrt())
    assert abs(norm - exact) <= 1e-7 * exact  # fp32 norms of 2048-element chunks on CPU (clip_grads)
    ref = _torch_adamw(before, grads, 1.0)
    for k in grads:
        assert torch.equal(unclipped[k], ref[k]), k
    max_norm = norm / 4  # active: the gradients shrink by ~4
    _, _, norm_c, clipped = _one_step(stage, clip=max_norm, eps=1.0)
    assert norm_c == norm  # the norm reported is the one before clipping, as Megatron's
    ref = _torch_adamw(before, grads, 1.0, coef=max_norm / (norm + 1e-6))
    moved = 0
    for k in grads:
        torch.testing.assert_close(clipped[k], ref[k], rtol=1e-7, atol=0)
        moved += int(not torch.equal(clipped[k], unclipped[k]))
    assert moved == len(grads)
