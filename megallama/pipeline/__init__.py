"""Pipeline parallelism: pure schedules, one runner, stage partitioning.

``get_forward_backward_func(pp, schedule)`` gives the function the training loop calls each step (no arguments:
the layout parallel_state holds, as Megatron-core reads it);
``build_model_chunks(config, schedule=...)`` gives this rank's model chunks; after backward (and after the
data-parallel grad sync) ``allreduce_embedding_gradients(chunks)`` sums tied-embedding and Chimera replica grads.
"""
from megallama.pipeline.finalize import allreduce_embedding_gradients, sync_chimera_replica_gradients  # noqa: F401
from megallama.pipeline.microbatch_scheduler import MicrobatchScheduler  # noqa: F401
from megallama.pipeline.model_chunks import build_model_chunks, model_parts, unwrap_model  # noqa: F401
from megallama.pipeline.partition import (StageCosts, costs_from_config, num_microbatches,  # noqa: F401
                                          partition_layers, validate_pipeline_config)
from megallama.pipeline.runner import PipelineRunner, get_forward_backward_func  # noqa: F401
from megallama.pipeline.schedules import SCHEDULES, build_schedule  # noqa: F401
