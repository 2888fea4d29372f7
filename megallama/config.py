"""Model configurations and the registry of named Llama variants.

The shapes are the official ones, so parameter counts match Meta's releases to the parameter
(``tests/test_config.py`` checks them on the meta device).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

from megallama.errors import ConfigError


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    name: str = "custom"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 4  # kv heads; == num_attention_heads means MHA
    vocab_size: int = 128256
    max_position_embeddings: int = 2048
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    # MoE (0 experts = dense model)
    num_experts: int = 0
    moe_router_topk: int = 2
    moe_layers: Optional[list] = None
    family: str = "llama3"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} attention heads; "
                "pick --hidden-size a multiple of --num-attention-heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{self.num_attention_heads} attention heads are not divisible into {self.num_query_groups} query "
                "groups; pick --num-query-groups dividing --num-attention-heads")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for RoPE; change --hidden-size or heads")
        return self

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw).validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- parameter counting (pure arithmetic, no tensors) ----
    def num_params(self, include_embedding: bool = True) -> int:
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + h * h
        mlp = 3 * h * f
        layer = attn + mlp + 2 * h
        total = self.num_layers * layer + h
        if include_embedding:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total


def llama_ffn_size(hidden: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Meta's FFN size rule: multiple_of * ceil(mult * int(8h/3) / multiple_of)."""
    f = int(2 * 4 * hidden / 3)
    if ffn_dim_multiplier is not None:
        f = int(ffn_dim_multiplier * f)
    return multiple_of * ((f + multiple_of - 1) // multiple_of)


_L31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_L32 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _l1(name, **kw):
    base = dict(vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0, norm_eps=1e-6, family="llama1")
    base.update(kw)
    return ModelConfig(name=name, **base)


def _l2(name, **kw):
    base = dict(vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5, family="llama2")
    base.update(kw)
    return ModelConfig(name=name, **base)


def _l3(name, **kw):
    base = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, norm_eps=1e-5, family="llama3")
    base.update(kw)
    return ModelConfig(name=name, **base)


_7B = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32)
_L3_8B = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8)
_L3_70B = dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8)

MODEL_REGISTRY: Dict[str, ModelConfig] = {
    # Ours: Llama 3 architecture and vocabulary; with the 128K vocab most of the size is the (tied) embedding.
    "tiny_llama3_50m": _l3("tiny_llama3_50m", num_layers=10, hidden_size=256, ffn_hidden_size=1792,
                           num_attention_heads=8, num_query_groups=4, max_position_embeddings=2048,
                           tie_word_embeddings=True),
    "tiny_llama3_150m": _l3("tiny_llama3_150m", num_layers=8, hidden_size=768, ffn_hidden_size=2048,
                            num_attention_heads=12, num_query_groups=4, max_position_embeddings=8192,
                            tie_word_embeddings=True),
    "llama1_7b": _l1("llama1_7b", **_7B),
    "llama2_7b": _l2("llama2_7b", **_7B),
    "llama2_13b": _l2("llama2_13b", num_layers=40, hidden_size=5120, ffn_hidden_size=13824,
                      num_attention_heads=40, num_query_groups=40),
    "llama2_70b": _l2("llama2_70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                      num_attention_heads=64, num_query_groups=8),
    "code_llama_7b": _l2("code_llama_7b", vocab_size=32016, max_position_embeddings=16384, rope_theta=1e6,
                         family="code_llama", **_7B),
    "llama3_8b": _l3("llama3_8b", **_L3_8B),
    "llama3_8b_instruct": _l3("llama3_8b_instruct", **_L3_8B),
    "llama3_70b": _l3("llama3_70b", **_L3_70B),
    "llama3_70b_instruct": _l3("llama3_70b_instruct", **_L3_70B),
    "llama3_405b": _l3("llama3_405b", num_layers=126, hidden_size=16384, ffn_hidden_size=53248,
                       num_attention_heads=128, num_query_groups=8, max_position_embeddings=131072,
                       rope_scaling=_L31),
    # Llama 3.1: the Llama 3 shapes with a 128K context through RoPE frequency scaling (405B exists only as 3.1)
    "llama3_1_8b": _l3("llama3_1_8b", max_position_embeddings=131072, rope_scaling=_L31, **_L3_8B),
    "llama3_1_8b_instruct": _l3("llama3_1_8b_instruct", max_position_embeddings=131072, rope_scaling=_L31, **_L3_8B),
    "llama3_1_70b": _l3("llama3_1_70b", max_position_embeddings=131072, rope_scaling=_L31, **_L3_70B),
    "llama3_1_70b_instruct": _l3("llama3_1_70b_instruct", max_position_embeddings=131072, rope_scaling=_L31,
                                 **_L3_70B),
    "llama3_1_405b": _l3("llama3_1_405b", num_layers=126, hidden_size=16384, ffn_hidden_size=53248,
                         num_attention_heads=128, num_query_groups=8, max_position_embeddings=131072,
                         rope_scaling=_L31),
    "llama3_2_1b": _l3("llama3_2_1b", num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                       num_attention_heads=32, num_query_groups=8, max_position_embeddings=131072,
                       rope_scaling=_L32, tie_word_embeddings=True),
    "llama3_2_3b": _l3("llama3_2_3b", num_layers=28, hidden_size=3072, ffn_hidden_size=8192,
                       num_attention_heads=24, num_query_groups=8, max_position_embeddings=131072,
                       rope_scaling=_L32, tie_word_embeddings=True),
}

# Official parameter counts (HF model cards / safetensors metadata) that tests hold the registry to.
OFFICIAL_PARAM_COUNTS = {
    "llama1_7b": 6_738_415_616,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "code_llama_7b": 6_738_546_688,
    "llama3_8b": 8_030_261_248,
    "llama3_8b_instruct": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_70b_instruct": 70_553_706_496,
    "llama3_405b": 405_853_388_800,
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_8b_instruct": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "llama3_1_70b_instruct": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}


def get_model_config(name: str, **overrides) -> ModelConfig:
    """Look up a named variant, optionally overriding shape fields (None values are ignored)."""
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(sorted(MODEL_REGISTRY))}")
    cfg = dataclasses.replace(MODEL_REGISTRY[name])
    kw = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**kw) if kw else cfg.validate()


def list_models():
    return sorted(MODEL_REGISTRY)
