"""What a rank contributes to a checkpoint, by name: model tensors, RNG states.

Names are the HF parameter names the model already uses (layers keep their *global* index on every pipeline
stage), so a name means the same full tensor under any layout. The tied output-layer copy a last pipeline stage
holds (``output_weight``) is never saved: it is the embedding (``model.embed_tokens.weight``) and loads from it.
Nor is Chimera's replica chunk (a stage's copy of the mirror stage's layers): the rank that holds those layers as its
own first chunk writes them, and both copies load from that one.
"""
from __future__ import annotations

import random
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from megallama.checkpointing.sharded import Piece, piece_of
from megallama.mpu import parallel_state as ps
from megallama.optimizer.distributed import finish_param_sync, is_zero3

TIED_COPY = "output_weight"
EMBEDDING = "model.embed_tokens.weight"


def unwrap(module):
    """The LlamaForCausalLM inside DDP/ZeRO wrappers (``.module`` chains)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def canonical_name(name: str) -> str:
    return EMBEDDING if name == TIED_COPY else name


def named_model_tensors(model_chunks) -> Iterator[Tuple[int, str, torch.Tensor, Optional[torch.nn.Parameter]]]:
    """(chunk index, local name, tensor, parameter or None) of every persistent tensor of this rank's chunks.

    Under ZeRO-3 the tensors are full tp-local copies gathered by the wrapper (a collective over dp: every rank
    must iterate); otherwise the live parameters themselves."""
    finish_param_sync(model_chunks)  # --overlap-param-gather: the last step's all-gathers may be in flight
    for ci, chunk in enumerate(model_chunks):
        m = unwrap(chunk)
        params = dict(m.named_parameters())
        if is_zero3(chunk):
            for name, t in chunk.state_dict().items():
                yield ci, name, t, params.get(name)
            continue
        for name, t in m.state_dict(keep_vars=True).items():
            p = params.get(name)
            yield ci, name, (p if p is not None else t), p


def is_replica_chunk(model_chunks, ci: int) -> bool:
    """Chunk ``ci`` is Chimera's replica of another stage's part (written by that stage, not here)."""
    return ci > 0 and getattr(unwrap(model_chunks[ci]), "pipeline_schedule", None) == "chimera"


def tp_coords() -> Tuple[int, int]:
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def is_tp_replicated(param) -> bool:
    return not (getattr(param, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1)


def is_expert(param) -> bool:
    return bool(getattr(param, "expert_parallel", False)) and ps.get_expert_model_parallel_world_size() > 1


def local_piece(local: Optional[torch.Tensor], param, shape=None) -> Piece:
    """The box of the full tensor that this rank's tensor (or a state of ``param`` with ``shape``) holds."""
    tp, tp_rank = tp_coords()
    return piece_of(local, param, tp, tp_rank, ps.get_expert_model_parallel_world_size(),
                    ps.get_expert_model_parallel_rank(), shape=shape)


def writes(param, replicated_over_dp: bool = True) -> bool:
    """Whether this rank writes ``param`` (or a state of it): one copy of every box — tp rank 0 for tensors
    replicated over tp, and, for tensors replicated over data parallelism, the first dp (expert-dp) replica."""
    if is_tp_replicated(param) and ps.get_tensor_model_parallel_rank() != 0:
        return False
    if not replicated_over_dp:
        return True
    if is_expert(param):
        return ps.get_expert_data_parallel_rank() == 0  # expert-dp spans dp x cp / ep: one copy per ep rank
    return ps.get_data_parallel_rank(with_context_parallel=True) == 0


# ---------------------------------------------------------------- RNG
def get_rng_state() -> Dict[str, object]:
    """Every generator that can change the next step, as tensors/ints so ``weights_only`` loads them."""
    py = random.getstate()
    np_state = np.random.get_state()
    st = {"torch_cpu": torch.get_rng_state(),
          "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
          "python": torch.tensor(py[1], dtype=torch.int64), "python_version": int(py[0])}
    if py[2] is not None:
        st["python_gauss"] = float(py[2])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = torch.cuda.get_rng_state()
    try:
        from megallama.mpu.random import get_rng_tracker
        tracker = {}
        for name, s in get_rng_tracker().states.items():
            cpu, cuda = s if isinstance(s, tuple) else (s, None)
            tracker[name] = {"cpu": cpu} if cuda is None else {"cpu": cpu, "cuda": cuda}
        st["tracker"] = tracker
    except ImportError:  # pragma: no cover
        pass
    return st


def set_rng_state(st: Dict[str, object]) -> None:
    torch.set_rng_state(st["torch_cpu"])
    if "numpy" in st:
        np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), int(st.get("numpy_pos", 624)), 0, 0.0))
    if "python" in st:
        random.setstate((int(st.get("python_version", 3)), tuple(int(x) for x in st["python"].tolist()),
                        st.get("python_gauss")))
    if "torch_cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["torch_cuda"])
    if "tracker" in st:
        from megallama.mpu.random import get_rng_tracker
        tr = get_rng_tracker()
        for name, s in st["tracker"].items():
            tr.states[name] = (s["cpu"], s.get("cuda"))
