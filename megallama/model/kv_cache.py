"""Key/value cache for autoregressive decoding.

Each layer's K and V (after RoPE, this rank's tensor-parallel shard of the KV heads) of every token seen so far,
kept in buffers sized for the whole generation, so a decode step runs the model on its new token alone and attends
to the cached prefix: O(prefix) work a token instead of re-running the prefix. Buffers are made at a layer's first
``update``, with the shape and dtype of its K/V, so the cache needs no knowledge of the layout or the precision.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from megallama.errors import ConfigError


class KVCache:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.offset = 0  # tokens already cached (the position of the next token)
        self._k: Dict[int, torch.Tensor] = {}
        self._v: Dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` [b, s, kv heads, d] at positions [offset, offset + s); return the layer's K/V for
        [0, offset + s). ``advance`` moves the offset once every layer has run."""
        end = self.offset + k.shape[1]
        if end > self.max_length:
            raise ConfigError(f"the KV cache holds {self.max_length} tokens and this step needs {end}; make the "
                              "cache longer (prompt + new tokens)")
        if layer not in self._k:
            shape = (k.shape[0], self.max_length) + tuple(k.shape[2:])
            self._k[layer] = k.new_empty(shape)
            self._v[layer] = v.new_empty(shape)
        self._k[layer][:, self.offset:end] = k
        self._v[layer][:, self.offset:end] = v
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def advance(self, num_tokens: int) -> None:
        self.offset += num_tokens
