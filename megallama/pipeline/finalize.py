"""Gradient sums the pipeline layout owes after backward: tied embeddings and Chimera's replicas.

Tied word embeddings: stage 0 holds the embedding table, the last stage an ``output_weight`` copy initialised
identically; both copies must step with the sum of both grads (all-reduce over the embedding group).
Chimera: stage s also holds a replica of stage p-1-s's layers (the upward pipeline); the two copies of every
part exchange grads and add them, so both step identically. Both sums are linear, so they commute with the
data-parallel reduction; call after it (grads are read from ``main_grad`` when a wrapper keeps one, else
``.grad``). Additions are ordered so every copy ends bit-identical.
"""
from __future__ import annotations

from typing import List

import torch

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu.coalesced import all_reduce_coalesced
from megallama.pipeline.model_chunks import unwrap_model
from megallama.pipeline.p2p import P2POp, batch_send_recv, stage_rank

_REPLICA_TAG = 1 << 30


def _grad(p: torch.Tensor) -> torch.Tensor:
    g = getattr(p, "main_grad", None)
    if g is not None:
        return g
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _ties_embeddings(model) -> bool:
    """megallama's ``config.tie_word_embeddings`` or Megatron-core's ``share_embeddings_and_output_weights``; a
    user module that states neither ties nothing."""
    inner = unwrap_model(model)
    tied = getattr(getattr(inner, "config", None), "tie_word_embeddings", False)
    return bool(getattr(inner, "share_embeddings_and_output_weights", tied))


def _tied_params(model) -> List[torch.Tensor]:
    inner = unwrap_model(model)
    if hasattr(inner, "shared_embedding_or_output_weight"):  # a Megatron-core stage module: None on middle stages
        w = inner.shared_embedding_or_output_weight() if _ties_embeddings(inner) else None
        return [w] if w is not None else []
    embed = getattr(getattr(inner, "model", None), "embed_tokens", None)
    if getattr(inner, "pre_process", False) and embed is None:
        raise ConfigError(f"{type(inner).__name__} ties its embeddings but has neither model.embed_tokens nor "
                          "shared_embedding_or_output_weight(); add the latter (Megatron-core's) to name the weight")
    tied = [embed.weight] if getattr(inner, "pre_process", False) else []
    return tied + ([inner.output_weight] if hasattr(inner, "output_weight") else [])


def _flat_grads(model, only=None) -> List[torch.Tensor]:
    """Flat views of this rank's grads, laid out alike on every copy of the same part: a DDP/ZeRO wrapper's
    optimizer pieces (dp-reduced; this rank's shard at ZeRO 2-3), else each parameter's main_grad / grad."""
    if hasattr(model, "optimizer_pieces"):
        keep = None if only is None else {id(q) for q in only}
        return [pc.grad_view for pc in model.optimizer_pieces() if keep is None or id(pc.param) in keep]
    params = only if only is not None else [q for q in unwrap_model(model).parameters() if q.requires_grad]
    return [_grad(q).view(-1) for q in params]


def _sum_in_place(a: List[torch.Tensor], b: List[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        total = x + y  # the same addition on every copy: bit-identical results
        x.copy_(total)
        y.copy_(total)


def sync_chimera_replica_gradients(model_chunks) -> None:
    """Add the mirror stage's grads to both chunks of a Chimera stage (a no-op for other schedules). Chunks are
    known Chimera by their ``pipeline_schedule``, set by ``build_model_chunks`` and by the runner on each call."""
    chunks = [unwrap_model(m) for m in model_chunks]
    if len(chunks) != 2 or getattr(chunks[0], "pipeline_schedule", None) != "chimera":
        return
    p, s = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    mine = [_flat_grads(m) for m in model_chunks]
    if p - 1 - s == s:  # odd p: the middle stage holds both copies of its part
        _sum_in_place(*mine)
        return
    flat = [torch.cat(gs) if gs else torch.empty(0) for gs in mine]  # an empty stage's part: nothing to add
    recv = [torch.empty_like(f) for f in flat]
    peer = stage_rank(p - 1 - s)
    # My chunk 0 (part s) pairs with the peer's chunk 1, my chunk 1 with its chunk 0. Each side sends chunk 0
    # then 1 and receives in that same order, so NCCL's per-peer ordering matches them too. A part that is an
    # empty stage is empty on both copies, so both sides leave its pair out.
    ops = [P2POp(True, flat[0], peer, _REPLICA_TAG + 2 * s), P2POp(True, flat[1], peer, _REPLICA_TAG + 2 * s + 1),
           P2POp(False, recv[1], peer, _REPLICA_TAG + 2 * (p - 1 - s)),
           P2POp(False, recv[0], peer, _REPLICA_TAG + 2 * (p - 1 - s) + 1)]
    ops = [op for op in ops if op.tensor.numel()]
    for w in batch_send_recv(ops, ps.get_pipeline_model_parallel_group()) if ops else ():
        w.wait()
    for c in range(2):
        off = 0
        for g in mine[c]:
            n = g.numel()
            g.add_(recv[c][off:off + n].view_as(g))
            off += n


def allreduce_embedding_gradients(model_chunks) -> None:
    """Sum the tied embedding / output-layer grads over their copies (first and last stage), after summing
    Chimera's replicas (which hold both ends on the same ranks). Untied models and pp = 1 need nothing here.
    Works on bare chunks and on DDP/ZeRO wrappers (through their optimizer pieces), after their dp reduction.
    User stage modules: untied unless they set ``config.tie_word_embeddings`` or Megatron-core's
    ``share_embeddings_and_output_weights`` (the weight: ``shared_embedding_or_output_weight()``)."""
    sync_chimera_replica_gradients(model_chunks)
    if not model_chunks or not _ties_embeddings(model_chunks[0]):
        return
    per_chunk = [g for g in (_flat_grads(m, _tied_params(m)) for m in model_chunks if _tied_params(m)) if g]
    if len(per_chunk) == 2:  # both ends on this rank (Chimera): the replica sync already brought the others in
        _sum_in_place(*per_chunk)
        return
    group = ps.get_embedding_group()
    if not per_chunk or group is None or len(ps.get_embedding_ranks()) == 1:
        return
    all_reduce_coalesced(per_chunk[0], group)
