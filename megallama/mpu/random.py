"""Layout-independent initialisation and the tensor-parallel RNG tracker.

``init_parameter`` draws the *full* tensor from a generator seeded by (seed, parameter name) and keeps this
rank's shard, so the same seed gives the same full weights for any tp/pp/dp layout. The RNG tracker keeps a
separate "model-parallel" CUDA/CPU generator state per tp rank for dropout inside the TP region, as Megatron.
"""
import contextlib
import zlib

import torch

from megallama.mpu import parallel_state as ps


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def init_parameter(param: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill ``param`` (a local shard) with its slice of N(0, std) drawn for the full tensor.

    ``std=None`` means ones (norm weights), ``std=0`` zeros (biases)."""
    if std is None or std == 0:
        param.fill_(1.0 if std is None else 0.0)
        return
    tp = ps.get_tensor_model_parallel_world_size()
    dim = getattr(param, "partition_dim", 0)
    full_shape = list(param.shape)
    sharded = getattr(param, "tensor_model_parallel", False) and tp > 1
    if sharded:
        full_shape[dim] *= tp
    device = param.device if param.device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(_name_seed(seed, name))
    full = torch.empty(full_shape, dtype=torch.float32, device=device)
    full.normal_(0.0, std, generator=gen)
    if sharded:
        full = full.chunk(tp, dim=dim)[ps.get_tensor_model_parallel_rank()]
    param.copy_(full.to(param.dtype))


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


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seed the default generator identically across tp (data-parallel ranks differ by offset for dropout) and the
    model-parallel generator per tp rank, following Megatron's offsets."""
    offset = seed + 2718
    tp_seed = offset + ps.get_tensor_model_parallel_rank()
    data_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(data_seed)
    _TRACKER.reset()
    _TRACKER.add("model-parallel-rng", tp_seed)
