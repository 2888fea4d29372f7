"""Key/value caches for autoregressive decoding.

Each layer's K and V (after RoPE, this rank's tensor-parallel shard of the KV heads) of every token seen so far,
so a decode step runs the model on its new token alone and attends to the cached prefix instead of re-running it.
Buffers are made at a layer's first write, with the shape and dtype of its K/V, so a cache needs no knowledge of
the layout or the precision. The attention layer hands its q/k/v to ``cache.attention``.

Prompts of different lengths share a batch left-padded (``set_left_padding``): a row's pad keys are masked out, and
the row keeps the batch's positions, since RoPE makes attention depend only on the distance between a query and a
key, not on where the row starts (a pad query sees only itself, so its output stays finite).

``KVCache`` keeps the position on the host and attends to the written prefix only. ``StaticKVCache`` keeps every
shape fixed (the position is a device tensor, attention spans the whole buffer under a mask of the positions
written), which is what lets ``megallama.generation`` capture a decode step once as a CUDA graph and replay it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megallama.errors import ConfigError


class KVCache:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.offset = 0  # tokens already cached (the position of the next token)
        self._k: Dict[int, torch.Tensor] = {}
        self._v: Dict[int, torch.Tensor] = {}
        self.pad: Optional[torch.Tensor] = None  # [b] left-pad tokens per row

    def set_left_padding(self, pad: torch.Tensor) -> None:
        """``pad`` [b]: row i's first ``pad[i]`` tokens are padding, never attended to by its real tokens."""
        self.pad = pad if bool((pad > 0).any()) else None

    def _buffers(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._k:  # zeros: masked-out positions must not hold NaN bit patterns (0 * NaN = NaN)
            shape = (k.shape[0], self.max_length) + tuple(k.shape[2:])
            self._k[layer], self._v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        return self._k[layer], self._v[layer]

    def positions(self, num_tokens: int, device) -> torch.Tensor:
        """Positions of the next ``num_tokens`` tokens (for RoPE)."""
        return torch.arange(self.offset, self.offset + num_tokens, device=device)

    def causal_mask(self, positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        """Bool, True = attend: the query at each position sees the keys at that position and before; [s, num_keys],
        or with left padding [b, 1, s, num_keys] without the row's pad keys (a pad query sees itself)."""
        keys = torch.arange(num_keys, device=positions.device)
        mask = keys[None, :] <= positions[:, None]
        if self.pad is None:
            return mask
        real = keys[None, :] >= self.pad[:, None]  # [b, keys]
        own = keys[None, :] == positions[:, None]
        return ((mask[None] & real[:, None]) | own[None])[:, None]

    def attention(self, layer: int, q, k, v) -> torch.Tensor:
        """Store ``k``/``v`` [b, s, kv heads, d] at [offset, offset + s) and attend ``q`` to [0, offset + s)."""
        from megallama.model.attention import core_attention
        end = self.offset + k.shape[1]
        if end > self.max_length:
            raise ConfigError(f"the KV cache holds {self.max_length} tokens and this step needs {end}; make the "
                              "cache longer (prompt + new tokens)")
        kb, vb = self._buffers(layer, k, v)
        kb[:, self.offset:end] = k
        vb[:, self.offset:end] = v
        s = q.shape[1]
        if self.pad is None and self.offset == 0:  # the prompt: plain causal attention (SDPA's causal kernels)
            return core_attention(q, kb[:, :end], vb[:, :end])
        # after cached tokens one new token sees every key (no mask); a chunk, or a padded batch, needs the mask
        mask = None if s == 1 and self.pad is None else self.causal_mask(self.positions(s, q.device), end)
        return core_attention(q, kb[:, :end], vb[:, :end], causal=False, mask=mask)

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has run."""
        self.offset += num_tokens


class StaticKVCache(KVCache):
    """Fixed shapes for CUDA graphs: ``pos`` is a device scalar and advances on the device."""

    def __init__(self, max_length: int, device):
        super().__init__(max_length)
        self.pos = torch.zeros((), dtype=torch.long, device=device)

    def positions(self, num_tokens: int, device) -> torch.Tensor:
        return self.pos + torch.arange(num_tokens, device=device)

    def attention(self, layer: int, q, k, v) -> torch.Tensor:
        from megallama.model.attention import core_attention
        kb, vb = self._buffers(layer, k, v)
        idx = self.positions(k.shape[1], k.device)
        kb.index_copy_(1, idx, k)
        vb.index_copy_(1, idx, v)
        return core_attention(q, kb, vb, mask=self.causal_mask(idx, self.max_length))

    def advance(self, num_tokens: int) -> None:
        self.offset += num_tokens  # host bookkeeping; inside a replayed graph only ``pos`` moves
        self.pos.add_(num_tokens)
