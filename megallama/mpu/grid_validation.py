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
