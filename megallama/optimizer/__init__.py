"""Data parallelism and the optimizer: our own DDP with ZeRO stages 0-3, the sharded mixed-precision AdamW,
grad clipping across shards and model-parallel ranks, fp16 loss scaling.

    ddp = DistributedDataParallel(model, zero_stage=2)
    opt = get_megatron_optimizer(OptimizerConfig(lr=3e-4, clip_grad=1.0), [ddp])
    # per iteration: opt.zero_grad(); forward/backward (ddp.no_sync() on all but the last microbatch);
    #                ddp.finish_grad_sync(); ok, grad_norm, _ = opt.step()
"""
from megallama.optimizer.distrib_optimizer import DistributedOptimizer, get_megatron_optimizer  # noqa: F401
from megallama.optimizer.distributed import DistributedDataParallel  # noqa: F401
from megallama.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler  # noqa: F401
from megallama.optimizer.optimizer_config import OptimizerConfig  # noqa: F401
