"""Data parallelism and the optimizer: our own DDP with ZeRO stages 0-3, the sharded mixed-precision AdamW,
grad clipping across shards and model-parallel ranks, fp16 loss scaling.

    parallel_state.initialize_model_parallel(tp, pp)  # first: the groups below come from it (several ranks
    ddp = DistributedDataParallel(model, zero_stage=2, overlap_grad_reduce=True)   # without it: an error)
    opt = get_megatron_optimizer(OptimizerConfig(lr=3e-4, clip_grad=1.0), [ddp])
    # each iteration:
    opt.zero_grad()                       # also zeroes every chunk's grad buffer
    ...forward/backward per microbatch, all but the last inside ddp.no_sync()...
    ddp.finish_grad_sync()                # dp reduction done (stage 0: full grads, 1-3: this rank's shard)
    ddp.all_reduce_param_grads(params, group)   # only for sums over other groups (SP norms/tp, tied embedding)
    ok, grad_norm, _ = opt.step()         # ok is False when the step was skipped (inf/NaN grads)

Checkpoints: ``ddp.state_dict()`` is the module's (full params; a collective at stage 3); ``opt.state_dict()`` is
this rank's optimizer shard in parameter space; ``opt.load_state_dict(list_of_all_dp_ranks_states)`` loads it into
any dp size / stage; ``opt.gather_full_state_dict()`` gives the whole state (collective over dp).
"""
from megallama.optimizer.distrib_optimizer import DistributedOptimizer, get_megatron_optimizer  # noqa: F401
from megallama.optimizer.distributed import DistributedDataParallel  # noqa: F401
from megallama.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler  # noqa: F401
from megallama.optimizer.optimizer_config import OptimizerConfig  # noqa: F401
