"""A checkpoint saved right after an optimizer step under ZeRO-1/2 with --overlap-param-gather holds the updated
parameters, not the previous step's: the save waits for the parameter all-gathers that the step launched (they are
otherwise waited for only by the next forward). The all-gathers are made lazy here (they run at ``wait()``), so
reading the parameters without waiting is caught every time rather than when gloo happens to be slow."""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "optimizer"))

from dist_utils import run_distributed  # noqa: E402


def _job(rank, world, tmp, stage):
    import megallama.optimizer.distributed as ddp_module
    import zero_harness
    from megallama.checkpointing import save_checkpoint
    from megallama.model import build_model
    from megallama.mpu import parallel_state as ps
    from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
    real = ddp_module.all_gather_into_tensor

    class _Lazy:  # an async all-gather that has not run yet
        def __init__(self, out, inp, group):
            self.args, self.done = (out, inp, group), False

        def wait(self):
            if not self.done:
                out, inp, group = self.args
                real(out, inp, group=group)
                self.done = True

    def lazy_all_gather(out, inp, group=None, async_op=False):
        return _Lazy(out, inp, group) if async_op else real(out, inp, group=group)

    ddp_module.all_gather_into_tensor = lazy_all_gather
    ps.initialize_model_parallel()
    model = build_model(zero_harness.CFG, seed=zero_harness.SEED)
    ddp = DistributedDataParallel(model, zero_stage=stage, bucket_size=2000, overlap_param_gather=True)
    opt = get_megatron_optimizer(OptimizerConfig(**zero_harness.OPT), [ddp])
    zero_harness.train(ddp, opt, 0, 3, 1)
    save_checkpoint(tmp, 3, [ddp], opt, None, consumed_samples=0)
    ddp.finish_param_sync()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = torch.load(os.path.join(tmp, "iter_0000003", f"rank_{rank:05d}.pt"), weights_only=True)["tensors"]
    ps.destroy_model_parallel()
    dist.barrier()
    return sorted(n for n, t in live.items() if n in saved and not torch.equal(saved[n], t)), len(ddp.layout.buckets)


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_waits_for_the_overlapped_param_all_gathers(tmp_path, stage):
    stale, buckets = run_distributed(_job, 2, str(tmp_path), stage)[0]
    assert buckets > 2
    assert not stale, f"checkpoint holds the previous step's values of {stale}"
