"""The Llama decoder built from tensor-parallel layers, with HF ``LlamaForCausalLM`` parameter names.

``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
``model.layers.{i}.{input,post_attention}_layernorm``, ``model.norm``, ``lm_head`` (absent when tied).
Layers live in a ModuleDict keyed by their *global* index so a pipeline stage keeps HF names. Build on the meta
device and call ``init_weights`` after ``to_empty`` so that inspecting llama3_405b costs no memory.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn as nn

from megallama.config import ModelConfig
from megallama.model.attention import LlamaAttention
from megallama.model.mlp import LlamaMLP
from megallama.model.packed_attention import pack_documents
from megallama.model.norm import RMSNorm
from megallama.mpu import parallel_state as ps
from megallama.mpu import mappings
from megallama.mpu.cross_entropy import vocab_parallel_cross_entropy
from megallama.mpu.layers import ColumnParallelLinear, VocabParallelEmbedding, column_parallel_linear_forward
from megallama.mpu.linear_cross_entropy import linear_cross_entropy
from megallama.mpu.random import init_parameter
from megallama.ops.rope import rope_cos_sin, rope_frequencies


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int, sequence_parallel=False, device=None, dtype=None,
                 mlp: Optional[nn.Module] = None):
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, sequence_parallel, device, dtype)
        self.self_attn = LlamaAttention(config, layer_number, sequence_parallel, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, sequence_parallel, device, dtype)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, sequence_parallel, device, dtype)
        # selective recompute (model/recompute.py): the norms checkpointed (default) or their outputs discarded
        # (--recompute-modules layernorm); the whole MLP / MoE layer checkpointed (mlp, moe)
        self.recompute_norm = False
        self.discard_norm_output = False
        self.recompute_mlp = False

    def _norm(self, norm, x):
        """(normed x, the CheckpointWithoutOutput to release after the sublayer, or None)."""
        if not (x.requires_grad and torch.is_grad_enabled()):
            return norm(x), None
        if self.discard_norm_output:
            from megallama.model.recompute import CheckpointWithoutOutput
            ck = CheckpointWithoutOutput()
            return ck.checkpoint(norm, x), ck
        if self.recompute_norm:
            from megallama.model.recompute import checkpointed
            return checkpointed(norm, x), None
        return norm(x), None

    def _mlp(self, x):
        if self.recompute_mlp:
            from megallama.model.recompute import checkpointed
            return checkpointed(self.mlp, x)
        return self.mlp(x)

    def forward(self, x, cos, sin, document_ids=None, kv_cache=None):
        kw = {} if document_ids is None else {"document_ids": document_ids}  # packed sequences (SFT)
        if kv_cache is not None:  # decoding (megallama.generation)
            kw["kv_cache"] = kv_cache
        normed, ck = self._norm(self.input_layernorm, x)
        out = self.self_attn(normed, cos, sin, **kw)
        if ck is not None:
            ck.discard_output_and_register_recompute(out)
        x = x + out
        normed, ck = self._norm(self.post_attention_layernorm, x)
        out = self._mlp(normed)
        if ck is not None:
            ck.discard_output_and_register_recompute(out)
        return x + out


class LlamaModel(nn.Module):
    """Embedding (first stage), decoder layers ``layer_ids``, final norm (last stage)."""

    def __init__(self, config: ModelConfig, layer_ids: Sequence[int], pre_process: bool, post_process: bool,
                 sequence_parallel=False, device=None, dtype=None, layer_factory=None):
        super().__init__()
        self.config, self.pre_process, self.post_process = config, pre_process, post_process
        self.sequence_parallel = sequence_parallel
        if pre_process:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, config.init_method_std,
                                                       sequence_parallel, device=device, dtype=dtype)
        make = layer_factory or (lambda i: LlamaDecoderLayer(config, i, sequence_parallel, device, dtype))
        self.layers = nn.ModuleDict({str(i): make(i) for i in layer_ids})
        if post_process:
            self.norm = RMSNorm(config.hidden_size, config.norm_eps, sequence_parallel, device, dtype)
        self.register_buffer("inv_freq", rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                                                          device=device), persistent=False)
        self.recompute_granularity: Optional[str] = None
        self.recompute_method = "uniform"
        self.recompute_num_layers = 1

    def _run_layers(self, h, cos, sin, document_ids=None, kv_cache=None):
        layers = list(self.layers.values())
        if document_ids is not None:  # packed sequences: attention stays within each document
            layers = [functools.partial(layer, document_ids=document_ids) for layer in layers]
        if kv_cache is not None:
            layers = [functools.partial(layer, kv_cache=kv_cache) for layer in layers]
        if self.recompute_granularity != "full" or not torch.is_grad_enabled():
            for layer in layers:
                h = layer(h, cos, sin)
            return h
        from torch.utils.checkpoint import checkpoint

        def run(start, end):
            def f(x):
                for layer in layers[start:end]:
                    x = layer(x, cos, sin)
                return x
            return f

        n, k = len(layers), max(1, self.recompute_num_layers)
        if self.recompute_method == "uniform":  # checkpoint chunks of k layers, all of them
            for s in range(0, n, k):
                h = checkpoint(run(s, min(n, s + k)), h, use_reentrant=False)
        else:  # "block": checkpoint the first k layers individually, run the rest normally
            for i in range(n):
                h = checkpoint(run(i, i + 1), h, use_reentrant=False) if i < k else layers[i](h, cos, sin)
        return h

    def forward(self, input_ids=None, hidden_states=None, position_ids=None, document_ids=None, kv_cache=None):
        """``kv_cache`` (``KVCache``): the tokens continue the cached ones, at the cache's next positions."""
        h = self.embed_tokens(input_ids) if self.pre_process else hidden_states
        seq = input_ids.shape[1] if input_ids is not None else h.shape[1] * (
            ps.get_tensor_model_parallel_world_size() if self.sequence_parallel else 1)
        if position_ids is None and kv_cache is not None:
            position_ids = kv_cache.positions(seq, h.device)
        elif position_ids is None:
            position_ids = torch.arange(seq, device=h.device)
            if ps.get_context_parallel_world_size() > 1:  # this rank's zig-zag chunks of the whole sequence
                from megallama.mpu.context_parallel import get_position_ids_on_this_cp_rank
                position_ids = get_position_ids_on_this_cp_rank(seq * ps.get_context_parallel_world_size(), h.device)
        cos, sin = rope_cos_sin(self.inv_freq.to(h.device), position_ids)
        document_ids = pack_documents(document_ids, h, self.config.head_dim)  # once for all layers
        h = self._run_layers(h, cos, sin, document_ids, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.post_process:
            h = self.norm(h)
        return h


class LlamaForCausalLM(nn.Module):
    """Full model or one pipeline stage. ``forward`` returns per-token losses [b, s] when labels are given,
    else this rank's vocab shard of the logits (gathered over tp when ``gather_logits``)."""

    def __init__(self, config: ModelConfig, layer_ids: Optional[Sequence[int]] = None, pre_process: bool = True,
                 post_process: bool = True, sequence_parallel: bool = False, device=None, dtype=None,
                 layer_factory=None):
        super().__init__()
        config.validate()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        ids = list(range(config.num_layers)) if layer_ids is None else list(layer_ids)
        self.model = LlamaModel(config, ids, pre_process, post_process, self.sequence_parallel, device, dtype,
                                layer_factory)
        self.share_embeddings = config.tie_word_embeddings
        self.input_tensor = None  # set by the pipeline schedule on stages after the first
        if post_process and not config.tie_word_embeddings:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                                sequence_parallel=self.sequence_parallel,
                                                init_std=config.init_method_std, device=device, dtype=dtype)
        elif post_process and not pre_process:
            # Tied weights on a last stage that holds no embedding: a copy kept in sync over the embedding group.
            self.output_weight = nn.Parameter(torch.empty(
                config.vocab_size // ps.get_tensor_model_parallel_world_size(), config.hidden_size, device=device,
                dtype=dtype))
            self.output_weight.tensor_model_parallel = ps.get_tensor_model_parallel_world_size() > 1
            self.output_weight.partition_dim = 0
            self.output_weight.init_std = config.init_method_std
            self.output_weight.shared_embedding = True
        # Megatron's mark for --decoupled-lr: the input embedding and the output layer (each copy of a tied pair)
        ends = [getattr(self.model, "embed_tokens", None), getattr(self, "lm_head", None)]
        for p in [m.weight for m in ends if m is not None] + [getattr(self, "output_weight", None)]:
            if p is not None:
                p.is_embedding_or_output_parameter = True

    # ---------- weights ----------
    def output_layer_weight(self) -> torch.Tensor:
        if hasattr(self, "lm_head"):
            return self.lm_head.weight
        if self.pre_process:
            return self.model.embed_tokens.weight
        return self.output_weight

    @torch.no_grad()
    def init_weights(self, seed: int = 1234) -> "LlamaForCausalLM":
        """Deterministic, layout-independent init. A tied output copy takes the embedding's name so both match."""
        for name, p in self.named_parameters():
            key = "model.embed_tokens.weight" if name == "output_weight" else name
            init_parameter(p, key, seed, getattr(p, "init_std", self.config.init_method_std))
        self.model.inv_freq = rope_frequencies(self.config.head_dim, self.config.rope_theta,
                                               self.config.rope_scaling, device=self.model.inv_freq.device)
        return self

    # ---------- forward ----------
    def set_input_tensor(self, input_tensor) -> None:
        """Stages after the first read their input from the previous stage: the pipeline schedule sets it here
        before calling the forward step (Megatron's mechanism), so the step itself needs no pipeline logic."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def _head_input(self, h: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(h, True)
        return mappings.copy_to_tensor_model_parallel_region(h)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits over the *full* sequence: under SP the final-norm output
        [b, s/tp, h] is all-gathered here (and re-gathered in backward rather than kept)."""
        (logits,) = column_parallel_linear_forward(h, (self.output_layer_weight(),), None, self.sequence_parallel)
        return logits

    def forward(self, input_ids=None, labels=None, hidden_states=None, position_ids=None, gather_logits=False,
                loss_mask=None, document_ids=None):
        """Per-token losses [b, s] with ``labels``; with ``loss_mask`` too, the masked loss *sum* (a scalar)
        through the fused head + cross-entropy, which never holds the full logits."""
        if hidden_states is None and not self.pre_process:
            hidden_states = self.input_tensor
        h = self.model(input_ids=input_ids, hidden_states=hidden_states, position_ids=position_ids,
                       document_ids=document_ids)
        if not self.post_process:
            return h
        if labels is not None and loss_mask is not None:
            total, _ = linear_cross_entropy(self._head_input(h), self.output_layer_weight(), labels, loss_mask)
            return total
        logits = self.compute_logits(h)
        if labels is None:
            if gather_logits:
                logits = mappings.gather_from_tensor_model_parallel_region(logits)
            return logits
        return vocab_parallel_cross_entropy(logits, labels)


def build_model(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 1234, layer_ids=None,
                pre_process=True, post_process=True, sequence_parallel=False, init=True) -> LlamaForCausalLM:
    """Construct on the meta device, then materialise on ``device`` and initialise (unless device is meta)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, layer_ids, pre_process, post_process, sequence_parallel, dtype=dtype)
    if str(device) == "meta":
        return model
    # to_empty replaces meta Parameters by new ones and drops their attributes (tensor_model_parallel,
    # partition_dim, init_std, sequence_parallel ...), which init, grad sync and checkpoints rely on: carry them over.
    attrs = {name: dict(p.__dict__) for name, p in model.named_parameters()}
    model = model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.__dict__.update(attrs[name])
    if init:
        model.init_weights(seed)
    return model
