"""The layout's arithmetic, checked before any process group exists (the launcher, the memory estimator and
generation call it too): one ``ConfigError`` naming the size to change, instead of a hang in the first collective."""
from __future__ import annotations

from megallama.errors import ConfigError


def validate_model_shapes(tensor_model_parallel_size: int, model_config) -> None:
    """tp must divide the attention heads, the kv heads (query groups), the FFN size and the vocabulary.

    ``model_config`` is any object with those attributes (``megallama.config.ModelConfig``); missing ones are
    skipped."""
    tp = tensor_model_parallel_size
    checks = (("num_attention_heads", "attention heads", "--num-attention-heads"),
              ("num_query_groups", "kv heads (query groups)", "--num-query-groups"),
              ("ffn_hidden_size", "FFN hidden size", "--ffn-hidden-size"),
              ("vocab_size", "vocabulary size", "--vocab-size"))
    for attr, what, flag in checks:
        v = getattr(model_config, attr, None)
        if v and v % tp:
            raise ConfigError(f"tensor-parallel size {tp} does not divide the {what} {v}; choose "
                              f"--tensor-model-parallel-size dividing {v} (or change {flag})")


def validate_grid(world_size: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                  context_parallel_size: int = 1, expert_model_parallel_size: int = 1, model_config=None) -> int:
    """Check the layout against the world size (and the model's shapes, when given); return the data-parallel
    size. Pure arithmetic: call it before any process group exists."""
    tp, pp, cp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
                      expert_model_parallel_size)
    for name, v in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
        if v < 1:
            raise ConfigError(f"--{name}-model-parallel-size must be >= 1, got {v}")
    mp = tp * pp * cp
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {mp}; launch a multiple of "
            f"{mp} processes or change the parallel sizes")
    dp = world_size // mp
    if model_config is not None:
        validate_model_shapes(tp, model_config)
    if (dp * cp) % ep:
        raise ConfigError(f"expert parallel size {ep} must divide data-parallel x context-parallel size {dp * cp} "
                          f"(dp {dp} = world {world_size} / tp*pp*cp {mp}, cp {cp}); choose an ep dividing {dp * cp}")
    return dp


def hierarchical_cp_sizes_fit(sizes, context_parallel_size: int) -> bool:
    """[a2a size, p2p size] of the a2a+p2p context-parallel layout: both >= 2, their product the cp size."""
    return sizes is not None and len(sizes) == 2 and min(sizes) >= 2 and sizes[0] * sizes[1] == context_parallel_size


# Megatron-core's initialize_model_parallel keywords megallama has no other value for: name -> (default, why)
_MEGATRON_FIXED = {
    "pipeline_model_parallel_comm_backend": (None, "pipeline sends use the world's backend"),
    "use_sharp": (False, "SHARP is not set up here (NCCL_COLLNET_ENABLE is yours to set)"),
    "sharp_enabled_group": (None, "SHARP is not set up here"),
    "hybrid_context_parallel": (False, "context parallelism here splits every sequence over the whole cp group"),
    "num_distributed_optimizer_instances": (1, "the distributed optimizer is one instance over dp x cp"),
    "nccl_communicator_config_path": (None, "per-communicator NCCL settings are not read here"),
    "order": ("tp-cp-ep-dp-pp", "the grid's order is Megatron's default, tp-cp-ep-dp-pp"),
    "get_embedding_ranks": (None, "the embedding group is the first and last pipeline stage"),
    "get_position_embedding_ranks": (None, "a Llama has no position embedding"),
    "high_priority_stream_groups": (None, "communicators are made with NCCL's default priority"),
    "create_all_gather_group": (False, "parameter all-gathers share the dp x cp group"),
}


def check_megatron_init_kwargs(tensor_model_parallel_size: int, context_parallel_size: int, kwargs: dict):
    """Megatron-core's extra ``initialize_model_parallel`` keywords: returns (timeout minutes or None, hierarchical
    cp sizes or None); a value megallama does not have is one ``ConfigError``, an unknown name a ``TypeError``."""
    kwargs = dict(kwargs)
    minutes = kwargs.pop("distributed_timeout_minutes", None)
    hierarchical = kwargs.pop("hierarchical_context_parallel_sizes", None)
    if hierarchical is not None and not hierarchical_cp_sizes_fit(hierarchical, context_parallel_size):
        raise ConfigError(f"hierarchical_context_parallel_sizes {list(hierarchical)} must be [a2a size, p2p size], "
                          f"both >= 2, with a product of context_parallel_size {context_parallel_size}")
    etp = kwargs.pop("expert_tensor_parallel_size", None)
    if etp not in (None, tensor_model_parallel_size):
        raise ConfigError(f"expert_tensor_parallel_size {etp} is not supported: experts are sharded over the "
                          f"tensor-parallel group here; pass None or {tensor_model_parallel_size}")
    for name, value in kwargs.items():
        if name not in _MEGATRON_FIXED:
            raise TypeError(f"initialize_model_parallel() got an unexpected keyword argument {name!r}")
        default, why = _MEGATRON_FIXED[name]
        if value not in (default, [], ()):  # an empty list of groups asks for nothing either
            raise ConfigError(f"initialize_model_parallel({name}={value!r}) is not supported: {why}; pass "
                              f"{default!r} or leave it out")
    return minutes, hierarchical
