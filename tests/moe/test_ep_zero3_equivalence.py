"""ZeRO-3 with expert-parallel MoE layers (4 gloo ranks, fp32) equals one process: a MoE layer's experts are sharded,
gathered and reduce-scattered over the expert-data-parallel group, its dense params over dp x cp, both in the
layer's one unit; the grad norm counts each element once. 3 AdamW steps with clipping: losses within 1e-5
relative, the first step's averaged gradients (gathered from the shards) and the final parameters (gathered by the
ZeRO-3 state dict, as checkpoints are) within 1e-5 relative norm; a full state dict loaded back gives the same
parameters.

Layouts: dp4 with ep2 (expert-dp 2), cp2 x dp2 with ep2 (expert-dp 2) and with ep4 (expert-dp of one: the experts
are not sharded, the dense params are)."""
import pytest
import torch

import ep_harness as H
from dist_utils import run_distributed
from megallama.mpu import parallel_state as ps
from megallama.optimizer import DistributedDataParallel

STEPS = 3
LAYOUTS = {"dp4_ep2": (1, 2, 1), "cp2_dp2_ep2": (2, 2, 2), "cp2_dp2_ep4": (2, 4, 2)}  # name: (cp, ep, micro-batches)


def _reload(full):
    """A fresh ZeRO-3 wrapper (another seed) loads ``full`` (this ep rank's experts) and gives it back."""
    ps.initialize_model_parallel(1, 1, context_parallel_size=2, expert_model_parallel_size=2)
    try:
        torch.manual_seed(123)
        m = H.moe_model()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        ddp = DistributedDataParallel(m, zero_stage=3)
        E = H.MOE["num_experts"] // 2
        r = ps.get_expert_model_parallel_rank()
        sd = {k: torch.from_numpy(v[r * E:(r + 1) * E] if "experts" in k else v) for k, v in full.items()}
        sd.update({k: v for k, v in m.state_dict().items() if k not in sd})  # buffers
        ddp.load_state_dict(sd)
        return H.full_params(ddp)
    finally:
        ps.destroy_model_parallel()


def _job(rank, world):
    runs = {name: H.layout_run(cp, ep, 3, m, STEPS) for name, (cp, ep, m) in LAYOUTS.items()}
    return runs, _reload(runs["cp2_dp2_ep2"][2])


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, 4)


@pytest.fixture(scope="module")
def reference():
    """Every layout's micro-batches are single samples in global order (dp x micro-batches = 4)."""
    return run_distributed(H.reference_worker, 1, 4, 1, STEPS)[0]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_zero3_with_expert_parallelism_equals_one_process(results, reference, name):
    for r in range(4):
        H.assert_same(results[r][0][name], reference, f"{name} zero 3 rank {r}")


def test_zero3_expert_state_dict_loads_back(results):
    from dist_utils import rel_err
    for r in range(4):
        saved, loaded = results[r][0]["cp2_dp2_ep2"][2], results[r][1]
        assert set(saved) == set(loaded)
        for k, v in saved.items():
            assert rel_err(torch.from_numpy(loaded[k]), torch.from_numpy(v)) == 0.0, (r, k)
