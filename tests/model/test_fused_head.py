"""The fused head + cross-entropy equals logits -> F.cross_entropy, loss and gradients, with a loss mask."""
import torch
import torch.nn.functional as F

from megallama.config import ModelConfig
from megallama.model import build_model
from megallama.mpu.linear_cross_entropy import linear_cross_entropy

CFG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=300)


def test_linear_cross_entropy_matches_reference_in_chunks():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[3] = -100
    wts = torch.rand(37, dtype=torch.float64)
    total, per_tok = linear_cross_entropy(h, w, t, wts, chunk_rows=8)
    total.backward()
    ref_tok = F.cross_entropy(h @ w.t(), t, reduction="none")
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = (F.cross_entropy(h2 @ w2.t(), t, reduction="none") * wts.float()).sum()
    ref.backward()
    assert torch.allclose(per_tok.double(), ref_tok, rtol=1e-6, atol=1e-6)
    assert torch.allclose(total.double(), ref.double(), rtol=1e-6)
    assert torch.allclose(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_model_fused_path_equals_per_token_path():
    for tied in (False, True):
        cfg = CFG.replace(tie_word_embeddings=tied)
        a, b = build_model(cfg, seed=1), build_model(cfg, seed=1)
        ids = torch.randint(0, 300, (2, 24))
        labels = torch.roll(ids, -1, 1)
        mask = (torch.rand(2, 24) > 0.2).float()
        la = (a(ids, labels=labels) * mask).sum()
        lb = b(ids, labels=labels, loss_mask=mask)
        la.backward()
        lb.backward()
        assert abs(la.item() - lb.item()) / la.item() < 1e-6
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert (p.grad - q.grad).norm() / p.grad.norm() < 1e-5, n
