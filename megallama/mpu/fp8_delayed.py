"""Delayed scaling (``--fp8-recipe delayed``, Megatron's default recipe; Transformer Engine's ``DelayedScaling``).

Each fp8 linear keeps, per tensor role (its input, its weight, its output gradient), an amax history of
``--fp8-amax-history-len`` steps and the scale in use. A cast uses the scale as it stands (no amax pass before the
cast: the amax is read in the same pass as the cast) and records the tensor's amax; once per training step
``update_fp8_scales`` (the loop calls it after the gradients are reduced) takes, in one all-reduce, the MAX of the
recorded amaxes over the amax reduction group (data x tensor x context parallel, Megatron's
``get_amax_reduction_group``; Chimera's two copies of a part MAX theirs too: every rank then holds the same
histories and scales, so the run does not depend on the layout), pushes it into the history and computes the next
scale: ``fp8_max / amax / 2**margin`` with amax the history's ``max`` or ``most_recent`` entry; an amax of 0 or
inf/NaN keeps the previous scale. The first step runs with scale 1 (TE's initial scale). Nothing here syncs with
the host.

One step, not one microbatch: TE rolls the history at each ``fp8_autocast`` exit, which under Megatron is each
microbatch's forward (and each backward). Here the scales stay fixed for a whole optimizer step and the history
holds per-step amaxes (the MAX over its microbatches): a dp 2 run equals a run of 2 accumulated microbatches,
activation recompute re-casts with the very scales of the first forward, and the reduction is one collective per
step. With one microbatch per step the two agree; with m microbatches a history of length L spans L steps here
and L/m steps in TE. Forward passes without autograd (evaluation) use the scales and record nothing.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.distributed as dist

from megallama.mpu import parallel_state as ps
from megallama.mpu.fp8 import E4M3, Fp8Recipe

INPUT, WEIGHT, GRAD = 0, 1, 2  # the roles, in that order in every [..., 3] tensor below
_REPLICA_TAG = (1 << 30) + (1 << 28)  # p2p tags of the Chimera amax exchange (pipeline.finalize's grads: 1 << 30)


class Fp8Meta:
    """One linear's delayed-scaling state (on the weight's device). ``amax_history`` [len, 3]: newest first;
    ``scale`` [3]: what the casts use now; ``amax`` [3]: this step's amaxes so far, pushed by
    ``update_fp8_scales``."""

    def __init__(self, recipe: Fp8Recipe, device):
        self.recipe = recipe
        self.amax_history = torch.zeros(recipe.amax_history_len, 3, device=device)
        self.scale = torch.ones(3, device=device)
        self.amax = torch.zeros(3, device=device)

    def follow(self, device: torch.device) -> "Fp8Meta":
        """This state on ``device``: plain tensor attributes do not move with ``module.to()`` (a model built on the
        CPU, fp8 enabled, then moved to a GPU)."""
        if self.scale.device != device:
            self.amax_history, self.scale, self.amax = (t.to(device) for t in (self.amax_history, self.scale,
                                                                               self.amax))
        return self


def fp8_max(recipe: Fp8Recipe, device) -> torch.Tensor:
    """[3]: the largest value of each role's format (input and weight e4m3; the gradient's by the format)."""
    return torch.tensor([torch.finfo(E4M3).max, torch.finfo(E4M3).max, torch.finfo(recipe.grad_dtype).max],
                        device=device)


def scales_from_history(history: torch.Tensor, previous: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """[..., 3] scales from [..., len, 3] histories (TE's rule): the history's max or newest amax mapped onto the
    format's maximum, ``2**-margin`` below it; where that amax is 0 or not finite, the ``previous`` scale."""
    used = history.amax(-2) if recipe.amax_compute_algo == "max" else history[..., 0, :]
    fresh = fp8_max(recipe, history.device) / used.clamp(min=torch.finfo(torch.float32).tiny)
    fresh = fresh if recipe.margin == 0 else fresh * (2.0 ** -recipe.margin)
    return torch.where((used > 0) & torch.isfinite(used), fresh, previous)


def named_fp8_metas(model_chunks) -> Iterator[Tuple[int, str, Fp8Meta]]:
    """(chunk index, module name inside the unwrapped chunk, state) of every delayed-scaling linear, in module
    order (the same on every rank of a pipeline stage)."""
    for ci, chunk in enumerate(model_chunks):
        while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):  # DDP / ZeRO wrappers
            chunk = chunk.module
        for name, m in chunk.named_modules():
            meta = getattr(m, "fp8_meta", None)
            if isinstance(meta, Fp8Meta):
                yield ci, name, meta


def _reduce_max(t: torch.Tensor) -> None:
    """MAX over the amax reduction group: tp x cp, then dp (together every rank of this pipeline stage)."""
    if ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_tensor_and_context_parallel_group())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())


def _max_chimera_replicas(model_chunks, amax: torch.Tensor) -> None:
    """Chimera: stage s's chunk 0 and stage p-1-s's chunk 1 are copies of one part that each see half of the
    microbatches; MAX their amaxes (as their grads are summed) so both copies keep the same histories and scales,
    those of the one-process run (a checkpoint holds the owner's copy only). A no-op for other schedules."""
    from megallama.pipeline.model_chunks import unwrap_model
    from megallama.pipeline.p2p import P2POp, batch_send_recv, stage_rank
    if len(model_chunks) != 2 or getattr(unwrap_model(model_chunks[0]), "pipeline_schedule", None) != "chimera":
        return
    k0 = sum(1 for ci, _, _ in named_fp8_metas(model_chunks) if ci == 0)
    mine = [amax[:k0], amax[k0:]]
    p, s = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if p - 1 - s == s:  # odd p: the middle stage holds both copies
        torch.maximum(mine[0], mine[1], out=mine[0])
        mine[1].copy_(mine[0])
        return
    recv = [torch.empty_like(t) for t in mine]  # my chunk 0 pairs with the peer's chunk 1, and the reverse
    peer, tag = stage_rank(p - 1 - s), _REPLICA_TAG
    ops = [P2POp(True, mine[0], peer, tag + 2 * s), P2POp(True, mine[1], peer, tag + 2 * s + 1),
           P2POp(False, recv[1], peer, tag + 2 * (p - 1 - s)), P2POp(False, recv[0], peer, tag + 2 * (p - 1 - s) + 1)]
    for w in batch_send_recv(ops, ps.get_pipeline_model_parallel_group()):
        w.wait()
    for t, r in zip(mine, recv):
        torch.maximum(t, r, out=t)


@torch.no_grad()
def update_fp8_scales(model_chunks) -> int:
    """Once per training step, on every rank: reduce this step's amaxes, push them into the histories, compute
    the next scales, clear the amaxes. Returns how many linears were updated (0: no delayed scaling here)."""
    metas: List[Fp8Meta] = [m for _, _, m in named_fp8_metas(model_chunks)]
    if not metas:
        return 0
    recipe = metas[0].recipe
    amax = torch.stack([m.amax for m in metas])  # [k, 3]: one collective for the whole model
    _reduce_max(amax)
    _max_chimera_replicas(model_chunks, amax)
    old = torch.stack([m.amax_history for m in metas])  # [k, len, 3]
    history = torch.cat([amax[:, None], old[:, :-1]], 1)
    scales = scales_from_history(history, torch.stack([m.scale for m in metas]), recipe)
    torch._foreach_copy_([m.amax_history for m in metas], list(history.unbind(0)))
    torch._foreach_copy_([m.scale for m in metas], list(scales.unbind(0)))
    torch._foreach_zero_([m.amax for m in metas])
    return len(metas)


def load_fp8_meta(meta: Fp8Meta, history: torch.Tensor, scale: torch.Tensor) -> None:
    """Restore a saved history (any length: the newest ``len`` entries are kept, a longer history is padded with
    zeros, which no algorithm takes as an amax) and its scale, recomputed under this run's recipe (the same bits
    when the recipe is unchanged; the right scale for a changed format or margin)."""
    n = min(len(history), len(meta.amax_history))
    meta.amax_history.zero_()
    meta.amax_history[:n].copy_(history[:n])
    meta.scale.copy_(scales_from_history(meta.amax_history, scale.to(meta.scale.device), meta.recipe))
    meta.amax.zero_()
