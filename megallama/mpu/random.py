"""Layout-independent initialisation and the tensor-parallel RNG tracker.

``init_parameter`` draws the *full* tensor (in blocks of rows) from generators seeded by (seed, parameter name)
and keeps this rank's shard, so the same seed gives the same full weights for any tp/pp/dp layout. The RNG
tracker keeps a separate "model-parallel" CUDA/CPU generator state per tp rank for dropout inside the TP region,
as Megatron.
"""
import contextlib
import math
import zlib

import torch

from megallama.mpu import parallel_state as ps


def _name_seed(seed: int, name: str, block: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}#{block}".encode())) % (2**63 - 1)


_BLOCK_NUMEL = 1 << 24  # elements per drawn block (whole rows); part of the init recipe: changing it changes weights


@torch.no_grad()
def init_parameter(param: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill ``param`` (a local shard) with its slice of N(0, std) drawn for the full tensor.

    The full tensor is drawn in fixed blocks of rows, each from its own generator seeded by (seed, name, block):
    the blocks depend only on the full shape, so any tp gives the same full weights, a row-sharded rank draws only
    its own blocks, and no rank ever holds more than one block of the full tensor at once.
    ``std=None`` means ones (norm weights), ``std=0`` zeros (biases)."""
    if std is None or std == 0:
        param.fill_(1.0 if std is None else 0.0)
        return
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dim = getattr(param, "partition_dim", 0)
    sharded = getattr(param, "tensor_model_parallel", False) and tp > 1
    full_shape = list(param.shape) or [1]
    if sharded:
        full_shape[dim] *= tp
    rows, row_numel = full_shape[0], math.prod(full_shape[1:])
    block = max(1, _BLOCK_NUMEL // max(row_numel, 1))
    r0, r1 = (rank * param.shape[0], (rank + 1) * param.shape[0]) if sharded and dim == 0 else (0, rows)
    device = param.device if param.device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=device)
    out = param if param.dim() else param.view(1)
    for b0 in range((r0 // block) * block, r1, block):
        b1 = min(b0 + block, rows)
        gen.manual_seed(_name_seed(seed, name, b0 // block))
        chunk = torch.empty([b1 - b0] + full_shape[1:], dtype=torch.float32, device=device)
        chunk.normal_(0.0, std, generator=gen)
        lo, hi = max(b0, r0), min(b1, r1)
        piece = chunk[lo - b0:hi - b0]
        if sharded and dim != 0:
            width = param.shape[dim]
            piece = piece.narrow(dim, rank * width, width)
        out[lo - r0:hi - r0].copy_(piece.to(param.dtype))


class RNGStatesTracker:
    """Named RNG states, forked around regions that need per-tp-rank randomness (dropout in TP regions)."""

    def __init__(self):
        self.states = {}

    def reset(self):
        self.states = {}

    def add(self, name: str, seed: int):
        if name in self.states:
            raise ValueError(f"RNG state {name} already exists")
        orig = _get_state()
        torch.manual_seed(seed)
        self.states[name] = _get_state()
        _set_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states:
            raise ValueError(f"RNG state {name} is not added")
        orig = _get_state()
        _set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state()
            _set_state(orig)


def _get_state():
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_state(s):
    torch.set_rng_state(s[0])
    if s[1] is not None:
        torch.cuda.set_rng_state(s[1])


_MODEL_PARALLEL_RNG = "model-parallel-rng"
_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Megatron's seeding: the default generator gets ``seed + 100 * pp_rank`` (same on all tp ranks, so
    replicated work such as dropout on the residual under plain TP agrees); the tracked "model-parallel-rng"
    stream gets ``that + 2718 + tp_rank`` so dropout inside the TP region (on sharded heads/features) differs per
    tp rank. Data-parallel replicas share both (dropout 0 is the default; layouts compare only without it)."""
    base = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(base)
    _TRACKER.reset()
    _TRACKER.add(_MODEL_PARALLEL_RNG, base + 2718 + ps.get_tensor_model_parallel_rank())


# Megatron's names.
get_cuda_rng_tracker = get_rng_tracker
model_parallel_cuda_manual_seed = model_parallel_seed
