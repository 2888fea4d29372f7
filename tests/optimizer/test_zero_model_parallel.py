"""ZeRO composed with tensor parallelism (tp = 2 x dp = 2 gloo ranks): ZeRO shards over the dp group only, and
the grad norm counts every element once (tp-sharded params on every tp rank, replicated ones on tp rank 0).
Checked against single-process torch AdamW. Pipeline parallelism: test_zero_pipeline.py."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import rel_err, run_distributed
from megallama.model import build_model
from megallama.mpu import parallel_state as ps
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from zero_harness import CFG, OPT, SEED, reference_run, train

STEPS = 6
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _full(p, name, tp):
    """Gather a tp-sharded parameter to its full shape (for comparison with the single-process model)."""
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(parts, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=p.partition_dim)


def _tp_job(stage):
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model = build_model(CFG, seed=SEED)
    ddp = DistributedDataParallel(model, zero_stage=stage, bucket_size=4000, overlap_grad_reduce=True)
    opt = get_megatron_optimizer(OptimizerConfig(**OPT), [ddp])
    losses, norms = train(ddp, opt, 0, STEPS, 2)
    sd = ddp.state_dict()
    params = {n: _full(p, n, 2).numpy() for n, p in model.named_parameters()} if stage < 3 else None
    if stage == 3:  # full params come from the state dict; tp shards still need gathering
        named = dict(model.named_parameters())
        params = {}
        for n, t in sd.items():
            p = named[n]
            if getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(2)]
                dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
                t = torch.cat(parts, dim=p.partition_dim)
            params[n] = t.numpy()
    ps.destroy_model_parallel()
    return losses, norms, params


def _job(rank, world):
    out = {}
    for stage in (1, 3):
        out[("tp", stage)] = _tp_job(stage)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, 4)


def _check(losses, norms, params, ref, what):
    for i, (a, b) in enumerate(zip(losses, ref["losses"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}: loss at step {i + 1}: {a} vs {b}"
    for i, (a, b) in enumerate(zip(norms, ref["norms"])):
        assert abs(a - b) <= 1e-5 * b, f"{what}: grad norm at step {i + 1}: {a} vs {b}"
    for k, v in params.items():
        key = "model.embed_tokens.weight" if k == "output_weight" else k
        err = rel_err(torch.from_numpy(v), ref["params"][key])
        assert err <= 1e-5, f"{what}: {k} relative error {err:.2e}"


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_with_tensor_parallel(results, stage):
    ref = reference_run(STEPS)
    for r in range(4):
        _check(*results[r][("tp", stage)], ref, f"tp2 x dp2 stage {stage} rank {r}")
