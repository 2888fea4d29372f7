"""Several ranks but no ``initialize_model_parallel``: parallel_state answers "world of one", so our DDP reduced over
nobody and each rank silently trained its own model (a library user's audit: weights differed across ranks after
one step). Now the wrapper refuses with one line; an explicit ``data_parallel_group`` still works."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed


def _wrap(rank, world, explicit_group):
    from megallama.errors import ConfigError
    from megallama.optimizer import DistributedDataParallel
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    try:
        ddp = DistributedDataParallel(model, zero_stage=0, data_parallel_group=dist.group.WORLD if explicit_group
                                      else None)
    except ConfigError as e:
        return str(e)
    ddp.module(torch.full((1, 4), float(rank + 1))).sum().backward()
    ddp.finish_grad_sync()
    return ddp.dp_size


def test_ddp_without_parallel_state_is_refused():
    results = run_distributed(_wrap, 2, False)
    for rank, msg in results.items():
        assert isinstance(msg, str) and "initialize_model_parallel" in msg and "2 ranks" in msg, (rank, msg)
        assert "\n" not in msg


def test_ddp_with_an_explicit_group_needs_no_parallel_state():
    results = run_distributed(_wrap, 2, True)
    assert results == {0: 2, 1: 2}


@pytest.mark.parametrize("world", [1])
def test_one_process_needs_no_parallel_state(world):
    from megallama.optimizer import DistributedDataParallel
    assert DistributedDataParallel(torch.nn.Linear(4, 2), zero_stage=0).dp_size == 1
