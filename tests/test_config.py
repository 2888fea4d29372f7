import pytest
import torch

from megallama.config import MODEL_REGISTRY, OFFICIAL_PARAM_COUNTS, get_model_config, llama_ffn_size
from megallama.errors import ConfigError
from megallama.model import build_model


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_official_param_counts_on_meta(name):
    model = build_model(get_model_config(name), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAM_COUNTS[name] == get_model_config(name).num_params()


def test_every_seed_variant_registered():
    seed = {"tiny_llama3_50m", "tiny_llama3_150m", "llama1_7b", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b",
            "llama3_8b_instruct", "llama3_70b", "llama3_70b_instruct", "llama3_405b", "code_llama_7b",
            "llama3_2_1b", "llama3_2_3b"}
    assert seed <= set(MODEL_REGISTRY)


@pytest.mark.parametrize("name,size", [("tiny_llama3_50m", 50e6), ("tiny_llama3_150m", 150e6)])
def test_tiny_sizes_within_10_percent(name, size):
    cfg = get_model_config(name)
    assert cfg.vocab_size == 128256
    assert abs(cfg.num_params() - size) / size <= 0.10


def test_ffn_rule_matches_official():
    assert llama_ffn_size(4096, 256) == 11008  # Llama 1/2 7B
    assert llama_ffn_size(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert llama_ffn_size(8192, 4096, 1.3) == 28672  # Llama 2/3 70B
    assert llama_ffn_size(16384, 4096, 1.2) == 53248  # Llama 3.1 405B


def test_rope_scaling_and_context():
    assert get_model_config("llama3_405b").rope_scaling.factor == 8
    assert get_model_config("llama3_2_1b").rope_scaling.factor == 32
    assert get_model_config("llama3_2_1b").max_position_embeddings == 131072
    assert get_model_config("code_llama_7b").rope_theta == 1e6


def test_unknown_model_and_bad_shape():
    with pytest.raises(ConfigError, match="unknown model 'llama9'"):
        get_model_config("llama9")
    with pytest.raises(ConfigError, match="query groups"):
        get_model_config("tiny_llama3_50m", num_query_groups=3)


def test_meta_build_of_405b_costs_no_memory():
    m = build_model(get_model_config("llama3_405b"), device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())


def test_init_is_deterministic():
    cfg = get_model_config("tiny_llama3_50m", num_layers=2, vocab_size=500)
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
