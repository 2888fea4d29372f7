"""The delayed-scaling fp8 state in checkpoints (``--fp8-recipe delayed``): each linear's amax history and scale.

They are training state: a resumed run must cast with the scales the uninterrupted run would have used. After the
per-step reduction (``mpu.fp8_delayed``) every rank of a pipeline stage holds the same values, so they are saved
once (tensor- and data-parallel rank 0 of each stage) as whole tensors named ``fp8/<linear's name>.amax_history``
and ``.scale`` (the linear's global name: layers keep their global index on every stage), and any layout reads
them. A name with ``/`` is no model tensor: weight loads, the HF converter and runs without delayed scaling pass
over them.

On load: a checkpoint without them (saved with --fp8-recipe tensorwise, without fp8, or converted from HF) starts
the histories afresh (scale 1, TE's start); a different --fp8-amax-history-len keeps the newest entries; a changed
format, margin or compute algorithm recomputes the scale from the history. Each is said in one line.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from megallama.checkpointing.sharded import Piece, whole
from megallama.checkpointing.state import is_replica_chunk
from megallama.mpu import parallel_state as ps
from megallama.mpu.fp8_delayed import load_fp8_meta, named_fp8_metas

PREFIX = "fp8"


def _names(module_name: str) -> Tuple[str, str]:
    return f"{PREFIX}/{module_name}.amax_history", f"{PREFIX}/{module_name}.scale"


def fp8_state_entries(model_chunks) -> Iterator[Tuple[str, torch.Tensor, Piece]]:
    """(name, tensor, piece) this rank writes: all of its stage's states on tp and dp (x cp) rank 0, else none."""
    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    for ci, name, meta in named_fp8_metas(model_chunks):
        if not is_replica_chunk(model_chunks, ci):  # Chimera's copy: the owning stage writes it
            for key, t in zip(_names(name), (meta.amax_history, meta.scale)):
                yield key, t, whole(t.shape)


def load_fp8_state(model_chunks, reader) -> Optional[str]:
    """Restore every delayed-scaling linear's state from ``reader`` (a ``ShardReader``); returns the line to say
    when the checkpoint's state was missing or resized, else None."""
    fresh, resized = 0, set()
    for _, name, meta in named_fp8_metas(model_chunks):
        hist_name, scale_name = _names(name)
        if hist_name not in reader or scale_name not in reader:
            fresh += 1
            continue
        history = reader.read(hist_name, torch.float32)
        if len(history) != len(meta.amax_history):
            resized.add(len(history))
        load_fp8_meta(meta, history.to(meta.amax_history.device), reader.read(scale_name, torch.float32))
    if fresh:
        return (f"fp8: the checkpoint holds no delayed-scaling state for {fresh} linear layers (saved without "
                "--fp8-recipe delayed?); their amax histories start afresh")
    if resized:
        now = next(m for _, _, m in named_fp8_metas(model_chunks)).recipe.amax_history_len
        return (f"fp8: amax histories saved with length {sorted(resized)[0]}, --fp8-amax-history-len is {now}: "
                "the newest entries are kept")
    return None
