"""Model-parallel utilities: the process grid, TP layers and mappings, vocab-parallel cross-entropy.

One flat namespace, as Megatron's ``mpu`` (today ``megatron.core.parallel_state`` + ``megatron.core.tensor_parallel``),
so code written against those runs with ``from megallama.mpu import ColumnParallelLinear,
get_tensor_model_parallel_rank``. Submodules (``parallel_state``, ``mappings``, ``layers``, ``random``,
``linear_cross_entropy`` ...) stay importable by name; no re-exported name shadows one of them.
"""
from megallama.mpu import parallel_state  # noqa: F401
from megallama.mpu.parallel_state import (  # noqa: F401
    default_device, destroy_model_parallel, get_context_parallel_global_ranks, get_context_parallel_group,
    get_context_parallel_rank, get_context_parallel_world_size, get_data_parallel_global_ranks,
    get_data_parallel_group, get_data_parallel_rank, get_data_parallel_src_rank, get_data_parallel_world_size,
    get_embedding_group, get_embedding_ranks, get_expert_data_parallel_group, get_expert_data_parallel_rank,
    get_expert_data_parallel_world_size, get_expert_model_parallel_group, get_expert_model_parallel_rank,
    get_expert_model_parallel_world_size, get_grid_summary, get_model_parallel_group,
    get_pipeline_model_parallel_first_rank, get_pipeline_model_parallel_group, get_pipeline_model_parallel_last_rank,
    get_pipeline_model_parallel_next_rank, get_pipeline_model_parallel_prev_rank, get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_ranks, get_pipeline_model_parallel_world_size, get_tensor_and_context_parallel_group,
    get_tensor_and_data_parallel_group, get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank, get_tensor_model_parallel_world_size,
    get_virtual_pipeline_model_parallel_rank, get_virtual_pipeline_model_parallel_world_size,
    initialize_model_parallel, is_pipeline_first_stage, is_pipeline_last_stage, is_rank_in_embedding_group,
    model_parallel_is_initialized, set_virtual_pipeline_model_parallel_rank, validate_grid, validate_model_shapes)
from megallama.mpu.cross_entropy import vocab_parallel_cross_entropy  # noqa: F401
from megallama.mpu.layers import (  # noqa: F401
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linears,
    set_tensor_model_parallel_attributes)
from megallama.mpu.mappings import (  # noqa: F401
    all_to_all, copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region)
from megallama.mpu.random import (  # noqa: F401
    get_cuda_rng_tracker, get_rng_tracker, model_parallel_cuda_manual_seed, model_parallel_seed)
from megallama.mpu.sequence_parallel import allreduce_sequence_parallel_gradients  # noqa: F401
