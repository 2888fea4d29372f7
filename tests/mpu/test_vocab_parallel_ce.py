"""Vocab-parallel cross-entropy (and the fused head + CE) equal F.cross_entropy, ignore_index and grads included,
at tp=1 in-process and tp=4 / tp=2 x dp=2 on gloo."""
import torch
import torch.nn.functional as F

from dist_utils import rel_err, run_distributed
from megallama.mpu import parallel_state as ps
from megallama.mpu.cross_entropy import vocab_parallel_cross_entropy
from megallama.mpu.linear_cross_entropy import linear_cross_entropy

B, S, V, H = 3, 5, 32, 8


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, V, (B, S), generator=g)
    target[0, 1] = target[2, 4] = -100  # ignored positions
    target[1, 0] = V - 1  # last shard's last row
    upstream = torch.rand(B, S, generator=g, dtype=torch.float64)
    return logits, target, upstream


def _reference(logits, target, upstream):
    x = logits.clone().requires_grad_()
    loss = F.cross_entropy(x.view(-1, V), target.view(-1), ignore_index=-100, reduction="none").view(B, S)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad


def _ce_errors():
    n, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    logits, target, upstream = _data()
    ref_loss, ref_grad = _reference(logits, target, upstream)
    errors = []
    x = logits.chunk(n, -1)[r].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target)
    (loss * upstream).sum().backward()
    if rel_err(loss, ref_loss) > 1e-12 or loss[0, 1] != 0 or loss[2, 4] != 0:
        errors.append(f"tp={n} vocab_parallel_cross_entropy: loss")
    if rel_err(x.grad, ref_grad.chunk(n, -1)[r]) > 1e-12:
        errors.append(f"tp={n} vocab_parallel_cross_entropy: grad")
    if (ref_grad[0, 1] != 0).any() or (x.grad[0, 1] != 0).any():
        errors.append(f"tp={n}: ignored token must get no gradient")
    # fp32 logits of a bf16 head: math in fp32, grad in the input dtype
    xb = logits.chunk(n, -1)[r].to(torch.bfloat16).requires_grad_()
    lb = vocab_parallel_cross_entropy(xb, target)
    lb.sum().backward()
    if lb.dtype != torch.float32 or xb.grad.dtype != torch.bfloat16 or rel_err(lb, ref_loss) > 1e-2:
        errors.append(f"tp={n} bf16 logits")
    # fused head + CE with a loss mask, on this rank's weight shard
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, S, generator=g) > 0.3).double()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_tok = F.cross_entropy((h_ref @ w_ref.t()).view(-1, V), target.view(-1), reduction="none").view(B, S)
    (ref_tok * mask).sum().backward()
    h, w = hidden.clone().requires_grad_(), weight.chunk(n, 0)[r].clone().requires_grad_()
    total, per_tok = linear_cross_entropy(h, w, target, mask, chunk_rows=4)
    total.backward()
    h_grad = h.grad.clone()
    if n > 1:  # the caller's copy-to-TP mapping sums the partial d(hidden) over tp
        torch.distributed.all_reduce(h_grad, group=ps.get_tensor_model_parallel_group())
    if rel_err(per_tok, ref_tok.detach()) > 1e-12 or rel_err(total, (ref_tok * mask).sum()) > 1e-12:
        errors.append(f"tp={n} linear_cross_entropy: loss")
    if rel_err(h_grad, h_ref.grad) > 1e-12 or rel_err(w.grad, w_ref.grad.chunk(n, 0)[r]) > 1e-12:
        errors.append(f"tp={n} linear_cross_entropy: grads")
    return errors


def _job(rank, world):
    errors = []
    for tp in (4, 2):
        ps.initialize_model_parallel(tp)
        errors += _ce_errors()
        ps.destroy_model_parallel()
    return errors


def test_vocab_parallel_ce_tp1():
    assert not _ce_errors()


def test_vocab_parallel_ce_tp4_and_tp2():
    out = run_distributed(_job, 4)
    errors = [f"rank {r}: {e}" for r in sorted(out) for e in out[r]]
    assert not errors, "\n".join(errors)
