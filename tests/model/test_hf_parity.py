"""Logits parity with HF ``LlamaForCausalLM`` (fp32, 1e-5) on small random configs."""
import pytest
import torch

from megallama.config import ModelConfig, RopeScaling
from megallama.model import build_model

transformers = pytest.importorskip("transformers")


def to_hf_config(cfg: ModelConfig):
    rs = None
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        rs = dict(rope_type="llama3", factor=r.factor, low_freq_factor=r.low_freq_factor,
                  high_freq_factor=r.high_freq_factor, original_max_position_embeddings=r.original_max_position_embeddings,
                  rope_theta=cfg.rope_theta)
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False,
              mlp_bias=False, rope_theta=cfg.rope_theta)
    c = transformers.LlamaConfig(**kw)
    if rs is not None:
        # transformers 4.x reads rope_scaling, 5.x rope_parameters; set both.
        c.rope_scaling = dict(rs)
        if hasattr(c, "rope_parameters"):
            c.rope_parameters = dict(rs)
    c._attn_implementation = "eager"
    return c


CASES = {
    "gqa": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8, num_query_groups=2,
                       vocab_size=300, max_position_embeddings=256, rope_theta=500000.0),
    "mha_l2": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4,
                          num_query_groups=4, vocab_size=320, rope_theta=10000.0, norm_eps=1e-6),
    "rope31_tied": ModelConfig(num_layers=3, hidden_size=96, ffn_hidden_size=256, num_attention_heads=6,
                               num_query_groups=2, vocab_size=512, max_position_embeddings=4096,
                               rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
                               tie_word_embeddings=True),
    "rope32_untied": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                 num_query_groups=1, vocab_size=256, rope_scaling=RopeScaling(
                                     factor=32.0, original_max_position_embeddings=32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(name):
    cfg = CASES[name]
    torch.manual_seed(0)
    ours = build_model(cfg, seed=7).eval()
    hf = transformers.LlamaForCausalLM(to_hf_config(cfg)).eval()
    sd = {k: v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" and cfg.tie_word_embeddings for k in missing), missing
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 200 if cfg.rope_scaling else 48))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    # And the loss: ours gives per-token CE on shifted labels the caller built.
    labels = torch.roll(ids, -1, 1)
    with torch.no_grad():
        loss = ours(ids, labels=labels)
        ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, cfg.vocab_size), labels.reshape(-1),
                                                     reduction="none").view_as(loss)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
