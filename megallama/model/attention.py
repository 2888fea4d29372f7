"""Grouped-query attention with RoPE, tensor-parallel over heads.

q/k/v are separate ColumnParallelLinears (HF names ``q_proj``/``k_proj``/``v_proj``) run together through
``column_parallel_linears``: one all-gather of the normed [b, s/tp, h] input under sequence parallelism (one grad
all-reduce under plain TP) for all three; ``o_proj`` is a RowParallelLinear (reduce-scatter back to shards under
SP). The core runs through ``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels inside
torch), with K/V heads shared across query groups without materialising copies (``enable_gqa``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from megallama.mpu import parallel_state as ps
from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, column_parallel_linears, divide
from megallama.model.packed_attention import PackedDocuments, varlen_attention
from megallama.ops import apply_rope_qk

_HAS_GQA = "enable_gqa" in F.scaled_dot_product_attention.__doc__ if F.scaled_dot_product_attention.__doc__ else False


def core_attention(q, k, v, causal: bool = True, document_ids=None, mask=None):
    """q: [b, s, nq, d], k/v: [b, s_kv, nkv, d] -> [b, s, nq, d]. ``document_ids`` [b, s] (packed sequences): a
    token attends only to earlier tokens of its own document. ``mask`` [s, s_kv] or [b, 1, s, s_kv] bool (True =
    attend) replaces causality (a KV cache's queries sit after its cached keys; a padded batch hides its pads)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        causal = False
    elif document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]
        mask = (same & torch.ones_like(same[0]).tril())[:, None]
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        if _HAS_GQA:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            return out.transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_number: int, sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        h, d = config.hidden_size, config.head_dim
        self.head_dim, self.layer_number = d, layer_number
        self.num_heads = divide(config.num_attention_heads, tp, "number of attention heads")
        self.num_kv_heads = divide(config.num_query_groups, tp, "number of query groups (kv heads)")
        out_std = config.init_method_std / (2.0 * config.num_layers) ** 0.5
        kw = dict(bias=False, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.q_proj = ColumnParallelLinear(h, config.num_attention_heads * d, init_std=config.init_method_std, **kw)
        self.k_proj = ColumnParallelLinear(h, config.num_query_groups * d, init_std=config.init_method_std, **kw)
        self.v_proj = ColumnParallelLinear(h, config.num_query_groups * d, init_std=config.init_method_std, **kw)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, h, init_std=out_std, **kw)
        self.recompute_core_attention = False  # --recompute-modules core_attn (model/recompute.py)

    def forward(self, x, cos, sin, document_ids=None, kv_cache=None):
        """x: [b, s, h] (replicated) or [b, s/tp, h] under SP; returns the same layout. ``kv_cache``
        (``KVCache``, decoding): this step's K/V join the cached ones and the queries attend to all of them."""
        q, k, v = column_parallel_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        b, s = q.shape[:2]
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rope_qk(q, k, cos, sin)  # one launch for both
        if kv_cache is not None:
            out = kv_cache.attention(self.layer_number, q, k, v)
        elif self.recompute_core_attention:
            from megallama.model.recompute import checkpointed
            out = checkpointed(lambda q_, k_, v_: self._core(q_, k_, v_, document_ids), q, k, v)
        else:
            out = self._core(q, k, v, document_ids)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))

    @staticmethod
    def _core(q, k, v, document_ids):
        if ps.get_context_parallel_world_size() > 1:  # sequence sharded over cp: ring / all-to-all attention
            from megallama.model.context_parallel import context_parallel_attention
            return context_parallel_attention(q, k, v, document_ids=document_ids)
        if isinstance(document_ids, PackedDocuments):  # CUDA: flash attention per document
            return varlen_attention(q, k, v, document_ids)
        return core_attention(q, k, v, document_ids=document_ids)
