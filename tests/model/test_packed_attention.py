"""Packed documents: the varlen offsets by hand; on CPU the dense document mask stays (the twin the CUDA varlen
path is checked against); on CUDA, flash varlen attention equals the dense-mask attention forward and backward,
in one layer and through the whole model."""
import pytest
import torch

from megallama.model.packed_attention import document_offsets, pack_documents

IDS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3]])


def test_offsets_of_documents_across_samples():
    assert document_offsets(IDS).tolist() == [0, 3, 5, 8, 9, 14, 15, 16]
    assert document_offsets(torch.zeros(2, 4, dtype=torch.long)).tolist() == [0, 4, 8]  # a document per sample


def test_cpu_keeps_the_dense_mask():
    assert pack_documents(IDS, torch.zeros(2, 8, 64), 16) is IDS


def _random_docs(b, s, g):
    ids = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):
        cuts = torch.randint(1, s, (5,), generator=g).unique()
        for c in cuts.tolist():
            ids[i, c:] += 1
    return ids


def _rel(a, b):
    return (torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float())).item()


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_varlen_equals_the_dense_mask(hq, hkv):
    from megallama.model.attention import core_attention
    from megallama.model.packed_attention import PackedDocuments, varlen_attention, varlen_supported
    if not varlen_supported(torch.bfloat16, 64):
        pytest.skip("torch has no varlen_attn")
    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 512, 64
    ids = _random_docs(b, s, g).cuda()
    q, k, v = (torch.randn(b, s, h, d, generator=g).cuda().bfloat16().requires_grad_()
               for h in (hq, hkv, hkv))
    cu = document_offsets(ids)
    docs = PackedDocuments(ids, cu, int((cu[1:] - cu[:-1]).max()))
    out = varlen_attention(q, k, v, docs)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = core_attention(q32, k32, v32, document_ids=ids)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
    assert _rel(out, ref) < 1e-2
    for a, r in zip(grads, ref_grads):
        assert _rel(a, r) < 2e-2


@pytest.mark.gpu
def test_model_losses_and_grads_with_varlen_equal_the_dense_mask(monkeypatch):
    import megallama.model.attention as attention
    import megallama.model.llama as llama
    from megallama.config import ModelConfig
    from megallama.model.packed_attention import varlen_supported
    if not varlen_supported(torch.bfloat16, 64):
        pytest.skip("torch has no varlen_attn")
    cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                      vocab_size=512, max_position_embeddings=1024)
    g = torch.Generator().manual_seed(1)
    ids = _random_docs(2, 256, g).cuda()
    tokens = torch.randint(0, 512, (2, 257), generator=g).cuda()
    calls = []
    real = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda *a: calls.append(1) or real(*a))
    runs = []
    for dense in (False, True):
        if dense:
            monkeypatch.setattr(llama, "pack_documents", lambda ids, *a: ids)
        model = llama.build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=2)
        loss = model(tokens[:, :-1], labels=tokens[:, 1:], document_ids=ids).float().mean()
        loss.backward()
        runs.append((loss.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
        assert len(calls) == 2  # both layers of the first run, none of the second
    assert _rel(runs[0][0], runs[1][0]) < 1e-2
    assert _rel(runs[0][1], runs[1][1]) < 5e-2
