import pytest

from dist_utils import run_distributed
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps


def _grid(rank, world, tp, pp, cp, ep):
    ps.initialize_model_parallel(tp, pp, context_parallel_size=cp, expert_model_parallel_size=ep)
    return dict(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                dp=ps.get_data_parallel_rank(), cp=ps.get_context_parallel_rank(),
                ep=ps.get_expert_model_parallel_rank(), pp_ranks=ps.get_pipeline_model_parallel_ranks(),
                dp_ranks=ps.get_data_parallel_global_ranks(), embd=ps.get_embedding_ranks(),
                dpcp=ps.get_data_parallel_global_ranks(with_context_parallel=True))


def test_grid_order_pp_dp_cp_tp():
    out = run_distributed(_grid, 8, 2, 2, 1, 2)
    # tp ranks adjacent; pp outermost
    assert [out[r]["tp"] for r in range(8)] == [0, 1] * 4
    assert [out[r]["dp"] for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [out[r]["pp"] for r in range(8)] == [0] * 4 + [1] * 4
    assert out[0]["pp_ranks"] == [0, 4] and out[5]["pp_ranks"] == [1, 5]
    assert out[0]["dp_ranks"] == [0, 2] and out[0]["embd"] == [0, 4]
    assert [out[r]["ep"] for r in range(4)] == [0, 0, 1, 1]


def test_grid_with_cp():
    out = run_distributed(_grid, 4, 1, 1, 2, 1)
    assert [out[r]["cp"] for r in range(4)] == [0, 1, 0, 1]
    assert out[0]["dpcp"] == [0, 1, 2, 3]


def test_validate_grid_errors():
    with pytest.raises(ConfigError, match="not divisible"):
        ps.validate_grid(6, tensor_model_parallel_size=4)
    with pytest.raises(ConfigError, match="expert parallel"):
        ps.validate_grid(4, expert_model_parallel_size=3)
    assert ps.validate_grid(8, 2, 2) == 2


def test_defaults_without_init():
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_data_parallel_rank() == 0
    assert ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()


def _late_peer(rank, world):
    """--distributed-timeout-minutes 0.03 (1.8 s); rank 1 joins a dp all-reduce 6 s late."""
    import time

    import torch
    import torch.distributed as dist
    from megallama.arguments import parse_args
    from megallama.initialize import initialize_megatron
    args = parse_args(["--model", "tiny_llama3_50m", "--num-layers", "2", "--device", "cpu", "--mock-data",
                       "--distributed-timeout-minutes", "0.03"], world_size=world)
    initialize_megatron(args)
    if rank == 1:
        time.sleep(6)
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1), group=ps.get_data_parallel_group())
        out = ("done", time.time() - t0)
    except RuntimeError:
        out = ("timed out", time.time() - t0)
    ps.destroy_model_parallel()
    return out


def test_the_timeout_reaches_every_group():
    """Megatron passes --distributed-timeout-minutes to every group; a subgroup made without it waited torch's
    default (30 min for gloo, 10 for NCCL) instead."""
    res = run_distributed(_late_peer, 2, timeout=120)
    status, waited = res[0]
    assert status == "timed out" and waited < 5.0, res
