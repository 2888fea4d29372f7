"""A check, not a benchmark (one GPU): two ranks of an NCCL world share cuda:0 (lazy NCCL init, so no NCCL
collective runs), and the gloo twins are built as on a real NCCL world: distinct gloo groups with the data-parallel
members, usable for host collectives."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.getcwd())


def work(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    from megallama.mpu import parallel_state as ps
    ps.initialize_model_parallel(1, 1)
    g = ps.get_data_parallel_group_gloo()
    assert dist.get_backend(ps.get_data_parallel_group()) == "nccl", dist.get_backend(ps.get_data_parallel_group())
    assert dist.get_backend(g) == "gloo" and g is not ps.get_data_parallel_group()
    x = torch.tensor([rank + 1.0])
    dist.all_reduce(x, group=g)
    assert x.item() == 3.0, x
    assert dist.get_process_group_ranks(ps.get_data_parallel_group_gloo(with_context_parallel=True)) == [0, 1]
    print(f"rank {rank}: dp group on {dist.get_backend(ps.get_data_parallel_group())}, twin on "
          f"{dist.get_backend(g)}, gloo all-reduce {x.item()}", flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(2, 29533), nprocs=2)
    print("gloo twins on an NCCL world: OK")
