"""Single-process pieces of context parallelism: the logsumexp block attention (each backend against torch SDPA's
autograd, fp64 reference), the ring's merge identity (blocks merged by logsumexp and each block's backward run with
the *merged* output and logsumexp give the full attention's output and gradients), and the zig-zag split."""
import pytest
import torch
import torch.nn.functional as F

from dist_utils import rel_err
from megallama.errors import ConfigError
from megallama.model.block_attention import block_attention_backward, block_attention_forward, merge_blocks
from megallama.mpu.context_parallel import check_sequence_length, zigzag_indices, zigzag_to_natural

B, HQ, HKV, S, D = 2, 4, 2, 12, 8
TOL = 1e-5


def _inputs(seed=0, hkv=HKV):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (HQ, hkv, hkv))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 3 + [2] * 6])
    return q, k, v, docs[:, :, None] == docs[:, None, :]


def _reference(q, k, v, causal, allowed, dout):
    """fp64 SDPA with expanded kv heads, through autograd."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None] if causal else None
    if allowed is not None:
        mask = allowed if mask is None else mask & allowed
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         attn_mask=None if mask is None else mask[:, None])
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("backend", ["math", "sdpa_cpu"])
@pytest.mark.parametrize("causal,documents", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("hkv", [HQ, HKV, 1])
def test_block_attention_matches_sdpa(backend, causal, documents, hkv):
    q, k, v, allowed = _inputs(hkv=hkv)
    allowed = allowed if documents else None
    dout = torch.randn(B, HQ, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _reference(q, k, v, causal, allowed, dout)
    qf, kf, vf = (t.float() for t in (q, k, v))
    out, lse = block_attention_forward(qf, kf, vf, causal, allowed, backend=backend)
    grads = block_attention_backward(dout.float(), qf, kf, vf, out, lse, causal, allowed, backend=backend)
    assert lse.shape == (B, HQ, S) and lse.dtype == torch.float32
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads), ref):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < TOL, (name, rel_err(got, want))


@pytest.mark.parametrize("backend", ["math", "sdpa_cpu"])
@pytest.mark.parametrize("documents", [False, True])
def test_causal_block_with_fewer_queries_is_bottom_right(backend, documents):
    """The all-gather's call: the last ``sq`` queries against all ``S`` keys, causal, equal the same rows of full
    causal attention (flash attention's bottom-right alignment; SDPA's top-left mask would see fewer keys)."""
    q, k, v, allowed = _inputs(seed=5)
    allowed = allowed if documents else None
    dout = torch.randn(B, HQ, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    dout[:, :, :S - 5] = 0  # only the last 5 rows take part: their gradients are the block's
    ref = _reference(q, k, v, True, allowed, dout)
    qf, kf, vf = (t.float() for t in (q, k, v))
    rows = slice(S - 5, S)
    mask = None if allowed is None else allowed[:, rows]
    out, lse = block_attention_forward(qf[:, :, rows], kf, vf, True, mask, backend=backend)
    dq, dk, dv = block_attention_backward(dout[:, :, rows].float(), qf[:, :, rows], kf, vf, out, lse, True, mask,
                                          backend=backend)
    for name, got, want in (("out", out, ref[0][:, :, rows]), ("dq", dq, ref[1][:, :, rows]), ("dk", dk, ref[2]),
                            ("dv", dv, ref[3])):
        assert rel_err(got, want) < TOL, (name, rel_err(got, want))


def test_merged_blocks_give_full_attention_and_gradients():
    """Split the keys into three blocks (one causal diagonal-free split, as the ring's steps are): merging the
    blocks' (out, lse) and summing each block's backward taken with the merged (out, lse) is the full attention."""
    q, k, v, allowed = _inputs(seed=3)
    dout = torch.randn(B, HQ, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = _reference(q, k, v, False, allowed, dout)
    qf, kf, vf = (t.float() for t in (q, k, v))
    cuts = [(0, 4), (4, 9), (9, S)]
    out = lse = None
    for a, b in cuts:  # a row of docs[1] sees nothing of some blocks: lse -inf there, merged safely
        o, l = block_attention_forward(qf, kf[:, :, a:b], vf[:, :, a:b], False, allowed[:, :, a:b])
        out, lse = (o.float(), l) if out is None else merge_blocks(out, lse, o, l)
    assert rel_err(out, ref[0]) < TOL
    dq = torch.zeros_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for a, b in cuts:
        gq, gk, gv = block_attention_backward(dout.float(), qf, kf[:, :, a:b], vf[:, :, a:b], out, lse, False,
                                              allowed[:, :, a:b])
        dq += gq
        dk[:, :, a:b] += gk
        dv[:, :, a:b] += gv
    for got, want in zip((dq, dk, dv), ref[1:]):
        assert rel_err(got, want) < TOL


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v, _ = _inputs()
    none = torch.zeros(B, S, S, dtype=torch.bool)
    for backend in ("math", "sdpa_cpu"):
        out, lse = block_attention_forward(q.float(), k.float(), v.float(), False, none, backend=backend)
        assert torch.isneginf(lse).all() and (out == 0).all(), backend


@pytest.mark.parametrize("seq,cp", [(16, 2), (32, 4), (24, 3)])
def test_zigzag_split_is_a_balanced_partition(seq, cp):
    parts = [zigzag_indices(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    c = seq // (2 * cp)
    for r, idx in enumerate(parts):
        assert idx[:c].tolist() == list(range(r * c, (r + 1) * c))
        assert idx[c:].tolist() == list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
    # causal work (query, key) pairs with key <= query: the same on every rank
    work = {int(sum(int(p) + 1 for p in idx)) for idx in parts}
    assert len(work) == 1
    rank_major = torch.cat(parts)
    assert rank_major[zigzag_to_natural(seq, cp)].tolist() == list(range(seq))


def test_bad_sequence_length_is_a_config_error():
    with pytest.raises(ConfigError, match="divisible by 8"):
        check_sequence_length(20, 4)
    with pytest.raises(ValueError, match="MEGALLAMA_CP_ATTENTION"):
        block_attention_forward(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), True,
                                backend="nope")
