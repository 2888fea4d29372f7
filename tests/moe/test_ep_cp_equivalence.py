"""Expert parallelism with context parallelism (4 gloo ranks, fp32) equals one process: 3 AdamW steps of a tiny MoE
Llama (2 micro-batches a rank, loss mask, aux + z loss) at ZeRO 0, 1 and 2; losses within 1e-5 relative, the
first step's averaged gradients (every parameter, gathered from the ranks' pieces) and the final parameters within
1e-5 relative norm, on every rank.

Layouts (ep carved from dp x cp, Megatron-core's rule): cp2 x dp2 with ep2 (an expert group is one sequence's two
cp ranks; expert-dp spans dp) and ep4 (every rank its own expert; expert-dp of one), and cp4 x dp1 with ep2 (ep
inside cp, which the old dp-only rule could not place)."""
import pytest

import ep_harness as H
from dist_utils import run_distributed
from megallama.mpu import parallel_state as ps

STEPS, M = 3, 2
STAGES = (0, 1, 2)
LAYOUTS = {"cp2_dp2_ep2": (2, 2), "cp2_dp2_ep4": (2, 4), "cp4_dp1_ep2": (4, 2)}  # name: (cp, ep)


def _job(rank, world):
    ps.initialize_model_parallel(1, 1, context_parallel_size=2, expert_model_parallel_size=2)
    groups = {"ep": ps._RANKS["ep"], "edp": ps._RANKS["edp"], "ep_rank": ps.get_expert_model_parallel_rank(),
              "edp_size": ps.get_expert_data_parallel_world_size()}
    ps.destroy_model_parallel()
    runs = {(name, stage): H.layout_run(cp, ep, stage, M, STEPS) for name, (cp, ep) in LAYOUTS.items()
            for stage in STAGES}
    return groups, runs


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, 4)


@pytest.fixture(scope="module")
def references():
    """In spawned processes like the ranks (one intra-op thread): a different GEMM split in pytest's own process
    could flip a near-tie in the routing."""
    return {dp: run_distributed(H.reference_worker, 1, dp, M, STEPS)[0] for dp in (1, 2)}


def test_expert_groups_carve_dp_x_cp(results):
    # rank = dp_rank * cp + cp_rank: ep groups are consecutive dp x cp ranks, expert-dp strides across them
    assert [results[r][0]["ep"] for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [results[r][0]["edp"] for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [results[r][0]["ep_rank"] for r in range(4)] == [0, 1, 0, 1]
    assert results[0][0]["edp_size"] == 2


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_ep_with_cp_training_equals_one_process(results, references, name, stage):
    cp, _ = LAYOUTS[name]
    ref = references[4 // cp]
    for r in range(4):
        H.assert_same(results[r][1][(name, stage)], ref, f"{name} zero {stage} rank {r}")
