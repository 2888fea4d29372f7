"""Measuring memory without a GPU: the bytes autograd saves, and the peak of live tensor bytes.

``saved_bytes`` counts the distinct storages that ``saved_tensors_hooks`` sees during a forward, parameters
excluded (a checkpoint's inputs are saved through the same hook; tensors saved inside a checkpointed region are
not, as they are dropped). ``LiveBytes`` is a dispatch mode that tracks every storage an op creates until it dies,
with CUDA's 512-byte allocation rounding, so its peak is what ``torch.cuda.max_memory_allocated`` would add.
``tests/test_memory.py`` and ``benchmarks/measure_memory.py`` (on CPU) hold the estimator to these.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _round(n: int) -> int:
    return (n + 511) // 512 * 512


@contextlib.contextmanager
def saved_bytes(model):
    """with saved_bytes(model) as rec: loss = model(...)  ->  rec['bytes'], rec['tensors']"""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rec = {"bytes": 0, "tensors": []}
    seen = set()

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen and st.nbytes():
            seen.add(ptr)
            rec["bytes"] += st.nbytes()
            rec["tensors"].append((tuple(t.shape), t.dtype, st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield rec


class LiveBytes(TorchDispatchMode):
    """Current and peak bytes of storages that ops return under the mode; storages of ``ignore`` (parameters,
    grads, optimizer states: tensors that existed before) are not counted, nor are views of them."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}

    def _free(self, ptr):
        self.current -= self.live.pop(ptr, 0)

    def _track(self, t):
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), _round(st.nbytes())
        if not st.nbytes() or ptr in self.live or ptr in self.ignore or t.device.type == "meta":
            return
        self.live[ptr] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, ptr)

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
