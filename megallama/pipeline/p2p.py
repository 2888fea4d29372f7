"""Point-to-point transfers between pipeline stages: one batch of isend/irecv per plan step.

``batch_isend_irecv`` groups the ops (one NCCL group on GPU, so paired sends and receives cannot block each
other). Gloo runs the same call as separate isend/irecv in list order; if a backend refuses the batched call we
fall back to exactly that, once, with a warning. Receive buffers are allocated from the shape every stage knows
in advance: [micro_batch_size, seq_length (/ tp under sequence parallelism), hidden].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps

_BATCH_OK: Dict[str, bool] = {}
# id(group) -> (group, the peers connected): holding the group keeps its id from being reused by a later group
_WARMED: Dict[int, Tuple[object, Set[int]]] = {}


@dataclass
class P2POp:
    is_send: bool
    tensor: torch.Tensor
    peer: int  # global rank
    tag: int = 0


def tensor_shape(seq_length: Optional[int], micro_batch_size: Optional[int], hidden_size: int,
                 sequence_parallel: bool = False) -> Tuple[int, int, int]:
    """Shape of the hidden state passed between stages ([b, s, h]; s sharded over tp under SP)."""
    if seq_length is None or micro_batch_size is None:
        raise ConfigError("pipeline parallelism needs seq_length and micro_batch_size to size the stage-to-stage "
                          "buffers; pass them to the forward_backward function")
    tp = ps.get_tensor_model_parallel_world_size()
    if sequence_parallel and tp > 1:
        if seq_length % tp:
            raise ConfigError(f"sequence length {seq_length} is not divisible by the tensor-parallel size {tp}; "
                              "sequence parallelism needs --seq-length divisible by --tensor-model-parallel-size")
        seq_length //= tp
    return (micro_batch_size, seq_length, hidden_size)


def buffer_dtype_and_device(inner) -> tuple:
    """What this rank's hidden states travel in: its parameters' dtype and device; a rank whose chunks are all empty
    stages (Megatron's "E||L") holds none, so the dtype it was built for (``params_dtype``) and its buffers' device."""
    ref = next((q for m in inner for q in m.parameters() if q.is_floating_point()), None)
    if ref is not None:
        return ref.dtype, ref.device
    buf = next((b for m in inner for b in m.buffers()), None)
    return getattr(inner[0], "params_dtype", torch.float32), buf.device if buf is not None else torch.device("cpu")


def buffer_shape(module, seq_length, micro_batch_size) -> tuple:
    """The p2p buffers' shape, read from the model config as Megatron-core does (``config.hidden_size``); sequence
    parallelism from the module (megallama's models) or its config, off when neither says."""
    cfg = getattr(module, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    if hidden is None:
        raise ConfigError(f"pipeline model chunk {type(module).__name__} has no config.hidden_size, which sizes the "
                          "stage-to-stage buffers; give it a config with hidden_size (Megatron-core's "
                          "TransformerConfig, or e.g. module.config = types.SimpleNamespace(hidden_size=H))")
    sp = getattr(module, "sequence_parallel", getattr(cfg, "sequence_parallel", False))
    return tensor_shape(seq_length, micro_batch_size, hidden, bool(sp))


def _backend(group) -> str:
    return dist.get_backend(group) if group is not None else dist.get_backend()


def warm_up_group(group, peers: Sequence[int] = ()) -> None:
    """Before the first real message on ``group`` (every rank of it calls this, with a symmetric peer relation):

    - NCCL creates a pair's communicator on first use, and a batched p2p as the group's first call must involve
      every rank of the group: one collective on it first (once per group);
    - NCCL connects a pair inside the batch_isend_irecv that first uses it, blocking that CPU until the peer's
      call joins. If the peer's CPU is meanwhile held by a device-wide synchronisation (explicit, or implicit:
      cuBLAS creating its handle on autograd's thread at the first backward) that waits on a receive posted
      ahead, both wait forever: the first step hung so on 2 and 4 GPUs (H100, H200). So one small exchange with
      each of ``peers`` (global ranks) connects them all up front, once per pair.
    """
    if group is None or _backend(group) != "nccl":
        return
    dev = torch.device("cuda", torch.cuda.current_device())
    if id(group) not in _WARMED:
        dist.all_reduce(torch.zeros(1, device=dev), group=group)
        _WARMED[id(group)] = (group, set())
    connected = _WARMED[id(group)][1]
    new = sorted({p for p in peers if p != dist.get_rank()} - connected)
    if new:
        ops = [P2POp(s, torch.zeros(1, device=dev), p) for p in new for s in (True, False)]
        for w in batch_send_recv(ops, group):
            w.wait()
        torch.cuda.current_stream(dev).synchronize()
        connected.update(new)


def sends_report_completion(group=None) -> bool:
    """Whether a send's work says when its transfer is over without being waited on: NCCL's do (their CUDA
    events); gloo's ``is_completed`` stays False until ``wait()``."""
    return _backend(group) == "nccl"


def batch_send_recv(ops: Sequence[P2POp], group=None, use_batch: Optional[bool] = None) -> List:
    """Post ``ops`` (in this order) and return one work per op (waiting on any of a coalesced batch's works
    waits for the whole batch)."""
    if not ops:
        return []
    backend = _backend(group)
    if use_batch is None:
        use_batch = _BATCH_OK.get(backend, True)
    if use_batch:
        p2p = [dist.P2POp(dist.isend if o.is_send else dist.irecv, o.tensor, o.peer, group, o.tag) for o in ops]
        try:
            works = dist.batch_isend_irecv(p2p)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            if backend == "nccl":
                raise
            _BATCH_OK[backend] = False
            warnings.warn(f"batch_isend_irecv failed on {backend} ({e}); using ordered isend/irecv")
        else:
            works = list(works or [])
            if len(works) == len(ops):
                return works
            return [_AllOf(works)] * len(ops)
    return [(dist.isend if o.is_send else dist.irecv)(o.tensor, o.peer, group, o.tag) for o in ops]


class _AllOf:
    """A coalesced batch answers with fewer works than ops: each op's handle waits for all of them."""

    def __init__(self, works):
        self.works = works

    def wait(self):
        for w in self.works:
            w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def stage_rank(stage: int) -> int:
    """Global rank of ``stage`` in my pipeline group (same dp/cp/tp coordinates)."""
    return ps.get_pipeline_model_parallel_ranks()[stage]
