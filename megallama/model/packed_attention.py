"""Attention over packed documents on CUDA through flash attention's variable-length kernel (``varlen_attn``), as
Megatron does with Transformer Engine's THD layout: each document is its own causal sequence, so the kernel skips
every cross-document block instead of reading a dense [b, s, s] mask (which SDPA can only give to its slower
memory-efficient kernel, after repeating K/V for every query group).

``pack_documents`` turns ``document_ids`` [b, s] (documents contiguous within a sample: SFT packing and
--reset-attention-mask both make them so) into cumulative sequence offsets once per forward (one host sync for the
longest document, as Megatron's loader computes ``max_seqlen``), shared by every layer. Elsewhere (CPU, fp32,
context parallelism, no kernel) the ids stay a tensor and attention masks densely, the CPU twin this is tested
against.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional

import torch


@functools.lru_cache(maxsize=None)
def _kernel():
    """(varlen_attn, its parameters), or (None, {}) before torch 2.10. Imported on first use on CUDA: the module
    pulls in torch._dynamo (~3.5 s), which every CPU rank, test process and CLI call would otherwise pay."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    return varlen_attn, inspect.signature(varlen_attn).parameters


class PackedDocuments(NamedTuple):
    ids: torch.Tensor          # [b, s] the document of each token
    cu_seqlens: torch.Tensor   # int32 [n + 1]: document starts in the flattened b * s tokens, then b * s
    max_len: int               # the longest document


def document_offsets(document_ids: torch.Tensor) -> torch.Tensor:
    """int32 [n + 1] offsets of the documents of all samples in the flattened [b * s] tokens."""
    b, s = document_ids.shape
    flat = (document_ids.long() + torch.arange(b, device=document_ids.device)[:, None] * (s + 1)).reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    starts = torch.nonzero(new).flatten()
    return torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)


def varlen_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """On CUDA: flash attention's dtypes and head sizes."""
    return (dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256
            and _kernel()[0] is not None)


def pack_documents(document_ids: Optional[torch.Tensor], hidden: torch.Tensor, head_dim: int):
    """``PackedDocuments`` where the varlen kernel applies to attention over ``hidden`` (in autocast's dtype when
    on); else the ids unchanged."""
    from megallama.mpu import parallel_state as ps
    if document_ids is None or not hidden.is_cuda or ps.get_context_parallel_world_size() > 1:
        return document_ids
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    if not varlen_supported(dtype, head_dim):
        return document_ids
    cu = document_offsets(document_ids.to(hidden.device))
    return PackedDocuments(document_ids, cu, int((cu[1:] - cu[:-1]).max()))


def varlen_attention(q, k, v, docs: PackedDocuments) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d]; causal within each document."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    varlen_attn, params = _kernel()
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if hkv != hq:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    out = varlen_attn(q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                      docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len, **kw)
    return out.reshape(b, s, hq, d)
