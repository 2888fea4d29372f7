"""HF LlamaConfig (config.json) <-> our ModelConfig, exactly or not at all: what ``tools/convert_checkpoint.py``
writes and reads, and what ``--use-checkpoint-args`` takes from an HF model folder."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megallama.config import ModelConfig, RopeScaling
from megallama.errors import ConfigError


def is_hf_model_dir(path: str) -> bool:
    """An HF model folder (config.json), not a megallama run or checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json")) and not any(
        os.path.isfile(os.path.join(path, f)) for f in ("latest_checkpointed_iteration.txt", "common.pt"))


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        from megallama.checkpointing.files import holds_checkpoint
        if holds_checkpoint(hf_dir):  # the other direction's input
            raise ConfigError(f"{hf_dir} is a megallama checkpoint, not an HF model folder; convert it with "
                              "megallama-to-hf --load " + hf_dir) from None
        raise ConfigError(f"{path} is missing; an HF checkpoint directory needs its config.json") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-download it") from None


def hf_config_to_model_config(hf: dict, name: Optional[str] = None) -> ModelConfig:
    """Our ModelConfig from an HF LlamaConfig dict (transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x
    ``rope_parameters``); anything our model cannot represent exactly is refused."""
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"model_type '{hf.get('model_type')}' is not Llama; only LlamaForCausalLM converts")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"config.json has {key}={hf.get(key)}; megallama's Llama supports only {key}={ok}")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"config.json has head_dim={hf['head_dim']} != hidden_size/heads = {hidden // heads}; "
                          "not supported")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rs = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(f"rope scaling type '{kind}' is not supported (only Llama 3.1's 'llama3')")
        rs = RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                         high_freq_factor=float(scaling["high_freq_factor"]),
                         original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    vocab = hf["vocab_size"]
    eps = float(hf.get("rms_norm_eps", 1e-5))
    family = ("llama3" if vocab >= 128000 or theta == 500000.0 else "code_llama" if theta >= 1e6 else
              "llama1" if eps == 1e-6 else "llama2")  # informational only: shapes and rope decide the model
    return ModelConfig(name=name or hf.get("_name_or_path") or "hf_llama", num_layers=hf["num_hidden_layers"],
                       hidden_size=hidden, ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
                       num_query_groups=hf.get("num_key_value_heads") or heads, vocab_size=vocab,
                       max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
                       rope_scaling=rs, norm_eps=eps,
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       init_method_std=float(hf.get("initializer_range", 0.02)), family=family).validate()


def hf_shapes(cfg: ModelConfig) -> dict:
    """The shape of each HF tensor the config implies (what transformers' from_pretrained checks)."""
    h, f, q, kv = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_query_groups * cfg.head_dim
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
           "model.norm.weight": (h,)}
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
                 "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{part}.weight": shape for part, shape in per_layer.items()})
    return out


def model_config_to_hf_config(cfg: ModelConfig, dtype: torch.dtype, extra: Optional[dict] = None) -> dict:
    """An HF config.json both transformers 4.x (rope_theta/rope_scaling) and 5.x (rope_parameters) read."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                   "high_freq_factor": r.high_freq_factor,
                   "original_max_position_embeddings": r.original_max_position_embeddings}
        rope = dict(scaling, rope_theta=cfg.rope_theta)
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
         "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
         "initializer_range": cfg.init_method_std, "tie_word_embeddings": cfg.tie_word_embeddings,
         "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
         "torch_dtype": str(dtype).replace("torch.", ""), "use_cache": True}
    d.update(extra or {})
    return d
