"""Megatron's ``finalize_model_grads``: what the training step owes the gradients after the last backward and
before the optimizer (the data-parallel reduction, then the sums the model-parallel layout needs)."""
from __future__ import annotations

from megallama.mpu import parallel_state as ps


def finalize_model_grads(model_chunks, args, timers=None) -> None:
    """After the last backward (Megatron's order): finish each chunk's data-parallel reduction, then the sums the
    layout owes, on the dp-reduced grads whatever the ZeRO stage: sequence-parallel norm weights over tp, Chimera's
    replica pairs, and the tied embedding/output copies over the embedding group. All are linear, so they commute
    with the dp average. ``timers``: Megatron's timers of these three phases (--timing-log-level 1)."""
    from megallama.mpu.sequence_parallel import sequence_parallel_params
    from megallama.timers import Timers
    timers = timers or Timers(0, "minmax", False, None)
    timers.start("all-grads-sync")
    for m in model_chunks:
        m.finish_grad_sync()
    timers.stop("all-grads-sync")
    timers.start("layernorm-grads-all-reduce")
    if ps.get_tensor_model_parallel_world_size() > 1 and args.sequence_parallel:
        for m in model_chunks:
            m.all_reduce_param_grads(sequence_parallel_params(m.module), ps.get_tensor_model_parallel_group())
    timers.stop("layernorm-grads-all-reduce")
    timers.start("embedding-grads-all-reduce")
    _sum_pipeline_copies(model_chunks, args)
    timers.stop("embedding-grads-all-reduce")


def _sum_pipeline_copies(model_chunks, args) -> None:
    """Chimera's replica pairs and the tied embedding/output copies (pipeline parallelism only)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    from megallama.pipeline.finalize import sync_chimera_replica_gradients
    sync_chimera_replica_gradients(model_chunks)
    if args.model_config.tie_word_embeddings:
        for m in model_chunks:
            inner = m.module
            tied = [inner.model.embed_tokens.weight] if inner.pre_process else []
            tied += [inner.output_weight] if hasattr(inner, "output_weight") else []
            if tied:
                m.all_reduce_param_grads(tied, ps.get_embedding_group())
