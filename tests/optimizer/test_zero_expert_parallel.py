"""ZeRO 0-3 with expert-parallel MoE layers (4 gloo ranks, ep = 2: dp 4, expert-dp 2): expert params (``allreduce =
False``) are reduced over the expert-data-parallel group in buckets of their own and sharded over it (stage 3: also
gathered over it, in the MoE layer's unit), the rest over dp; the grad norm counts each expert once. Checked against
single-process torch AdamW on the whole model, fed the same microbatches (the MoE aux loss is one per micro-batch, so
the reference runs the dp ranks' micro-batches one by one, with the aux gradient scale 1 / micro-batches that the
training loop sets)."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import rel_err, run_distributed
from megallama.model import build_model
from megallama.model.moe import set_aux_loss_scale
from megallama.mpu import parallel_state as ps
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megallama.strategies import TrainingStrategy, apply_strategy
from zero_harness import CFG, GLOBAL_BATCH, OPT, SEED, batch, param_groups, train

STEPS, M = 4, 2
MOE = {"num_experts": 4, "experts_per_token": 2, "moe_aux_loss_coeff": 0.05, "moe_z_loss_coeff": 1e-2}
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _moe_model():
    m = build_model(CFG, seed=SEED)
    apply_strategy([m], TrainingStrategy("moe", dict(MOE)), seed=SEED)
    return m


def _reference():
    model = _moe_model()
    opt = torch.optim.AdamW(param_groups(model), lr=OPT["lr"], betas=(OPT["adam_beta1"], OPT["adam_beta2"]),
                            eps=OPT["adam_eps"], foreach=False)
    losses, norms = [], []
    dp = 4
    mb = GLOBAL_BATCH // dp // M
    set_aux_loss_scale(1.0 / (dp * M))
    for step in range(STEPS):
        x, y = batch(step)
        total = 0.0
        for i in range(dp * M):  # rank r's micro-batch j is sample block r * M + j: the global order
            loss = model(x[i * mb:(i + 1) * mb], labels=y[i * mb:(i + 1) * mb]).mean()
            (loss / (dp * M)).backward()
            total += loss.item() / (dp * M)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(p, t):
    t = t.detach().contiguous()
    if getattr(p, "expert_parallel", False):
        parts = [torch.empty_like(t) for _ in range(ps.get_expert_model_parallel_world_size())]
        dist.all_gather(parts, t, group=ps.get_expert_model_parallel_group())
        t = torch.cat(parts, dim=0)
    return t.numpy()


def _run(stage):
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    model = _moe_model()
    ddp = DistributedDataParallel(model, zero_stage=stage, bucket_size=3000, overlap_grad_reduce=True,
                                  overlap_param_gather=True)
    assert ddp.expert_comm is not None and ddp.expert_comm.size == 2
    opt = get_megatron_optimizer(OptimizerConfig(**OPT), [ddp])
    set_aux_loss_scale(1.0 / M)  # as the training loop: the aux losses' share of each micro-batch's gradient
    losses, norms = train(ddp, opt, 0, STEPS, M)
    ddp.finish_param_sync()  # the last step's overlapped all-gathers (read the params only after them)
    sd = ddp.state_dict()  # stage 3 gathers its shards
    params = {n: _full(p, sd[n]) for n, p in model.named_parameters()}
    ps.destroy_model_parallel()
    return losses, norms, params


def _job(rank, world):
    return {stage: _run(stage) for stage in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, 4)


def _reference_worker(rank, world):
    losses, norms, params = _reference()
    return losses, norms, {k: v.numpy() for k, v in params.items()}  # arrays survive the child's exit


@pytest.fixture(scope="module")
def reference():
    """In a spawned process like the ranks (one intra-op thread), not in pytest's own process: its thread count is
    whatever earlier tests left, and a different GEMM split can flip a near-tie in MoE routing."""
    losses, norms, params = run_distributed(_reference_worker, 1)[0]
    return losses, norms, {k: torch.from_numpy(v) for k, v in params.items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_expert_parallel_zero_matches_single_process(results, reference, stage):
    ref_losses, ref_norms, ref_params = reference
    for r in range(4):
        losses, norms, params = results[r][stage]
        what = f"ep2 x dp4 zero {stage} rank {r}"
        for i, (a, b) in enumerate(zip(losses, ref_losses)):
            assert abs(a - b) <= 1e-5 * b, f"{what}: loss at step {i + 1}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(norms, ref_norms)):
            assert abs(a - b) <= 1e-5 * b, f"{what}: grad norm at step {i + 1}: {a} vs {b}"
        assert set(params) == set(ref_params)
        for k, v in params.items():
            assert rel_err(torch.from_numpy(v), ref_params[k]) <= 1e-5, f"{what}: {k}"
