"""The a2a+p2p sub-groups live and die with the grid: one process (4 gloo ranks) builds cp 4 with
--hierarchical-context-parallel-sizes 2 2, destroys the grid, rebuilds another layout (tp 2 x cp 2) and then cp 4
again. After destroy the getter raises (None with check_initialized=False, as Megatron's), attention on the
rebuilt grid refuses the previous grid's groups instead of running on them, and the groups built again are new
objects that give full attention. (With at most 4 ranks 2 x 2 is the only hierarchical split: sizes are >= 2.)"""
import torch
import torch.distributed as dist

import cp_harness as H
from dist_utils import run_distributed
from megallama.model import context_parallel as mcp
from megallama.mpu import context_parallel as cpc
from megallama.mpu import parallel_state as ps


def _ranks(groups):
    return [dist.get_process_group_ranks(g) for g in groups]


def _job(rank, world):
    out = {}
    ps.initialize_model_parallel(1, 1, context_parallel_size=4)
    mcp.set_context_parallel_comm_type("a2a+p2p", [2, 2])
    first = cpc.get_hierarchical_context_parallel_groups()
    out["first"] = _ranks(first)
    ps.destroy_model_parallel()
    out["unchecked"] = cpc.get_hierarchical_context_parallel_groups(check_initialized=False)
    out["cp_group"] = ps.get_context_parallel_group()
    try:
        cpc.get_hierarchical_context_parallel_groups()
        out["getter"] = "returned"
    except RuntimeError as e:
        out["getter"] = str(e)
    # another layout, the comm type still a2a+p2p: the previous grid's sub-groups must not be used
    ps.initialize_model_parallel(2, 1, context_parallel_size=2)
    q, k, v = (torch.randn(1, 4, 2, 4) for _ in range(3))
    try:
        mcp.context_parallel_attention(q, k, v)
        out["stale"] = "ran"
    except RuntimeError as e:
        out["stale"] = str(e)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, context_parallel_size=4)
    try:
        mcp.set_context_parallel_comm_type("a2a+p2p", [2, 2])
        second = cpc.get_hierarchical_context_parallel_groups()
        out["second"] = _ranks(second)
        out["new_objects"] = all(a is not b for a, b in zip(first, second))
        out["errors"] = H.attention_errors(rank, world, {"a2a+p2p": mcp.hierarchical_attention})[0]
    finally:
        mcp.set_context_parallel_comm_type("p2p")
        ps.destroy_model_parallel()
    return out


def test_hierarchical_groups_are_destroyed_and_rebuilt_with_the_grid():
    results = run_distributed(_job, 4)
    for rank, res in results.items():
        want = [[rank - rank % 2, rank - rank % 2 + 1], [rank % 2, rank % 2 + 2]]  # a2a: adjacent; p2p: strided
        assert res["first"] == want and res["second"] == want, (rank, res["first"], res["second"])
        assert res["unchecked"] is None and res["cp_group"] is None, rank
        assert "not initialized" in res["getter"] and "set_context_parallel_comm_type" in res["getter"], res
        assert "not initialized" in res["stale"], (rank, res["stale"])
        assert res["new_objects"], rank
        assert len(res["errors"]) == 2
        for key, err in res["errors"].items():
            assert err < H.TOL, (rank, key, err)
