"""Fused output layer + cross-entropy that never materialises the [tokens, vocab] logits.

With a 128K vocabulary the logits (and their fp32 softmax) dominate small models' memory. This computes the
weighted sum of per-token losses chunk by chunk; each chunk's logits live only long enough to produce the loss and
the gradients w.r.t. the hidden states and the weight (Liger's trick: gradients in forward, so the head costs three
matmuls, not four). Works on a vocab-parallel weight shard: max, sum-exp and the target logit are all-reduced over
tp per chunk (tokens x 3 floats), and the partial d(hidden) is summed by the caller's copy-to-TP mapping.
"""
from typing import Optional

import torch
import torch.distributed as dist

from megallama.mpu import parallel_state as ps

_CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, weights, ignore_index, chunk_rows):
        tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
        dtype = _compute_dtype(hidden)
        n, vloc = hidden.shape[0], weight.shape[0]
        start = ps.get_tensor_model_parallel_rank() * vloc
        h, w = hidden.to(dtype), weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax math in fp32 (fp64 stays fp64)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        rows = chunk_rows or max(1, min(n, _CHUNK_BYTES // (4 * vloc)))
        for s in range(0, n, rows):
            e = min(n, s + rows)
            logits = (h[s:e] @ w.t()).to(acc)
            t = target[s:e]
            valid = t != ignore_index
            local = t - start
            mine = (local >= 0) & (local < vloc) & valid
            local = local.masked_fill(~mine, 0)
            mx = logits.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(mx.unsqueeze(-1))
            tgt = logits.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)
            probs = logits.exp_()
            sumexp = probs.sum(dim=-1)
            if tp > 1:
                stats = torch.stack([sumexp, tgt])
                dist.all_reduce(stats, group=group)
                sumexp, tgt = stats[0], stats[1]
            losses[s:e] = (sumexp.log() - tgt).masked_fill(~valid, 0.0)
            if need_grad:
                probs.div_(sumexp.unsqueeze(-1))
                probs.scatter_add_(1, local.unsqueeze(1), -mine.to(probs.dtype).unsqueeze(1))
                probs.mul_((weights[s:e] * valid).unsqueeze(-1))
                g = probs.to(dtype)
                grad_h[s:e] = g @ w
                grad_w += (g.t() @ h[s:e]).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return (losses * weights).sum(), losses.detach()

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_sum.to(grad_h.dtype)).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_sum).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         weights: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         chunk_rows: Optional[int] = None):
    """Returns (sum over tokens of weights * CE, per-token CE detached). ``hidden`` [..., H] is the input of the
    vocab-parallel head (already copied/gathered into the TP region), ``weight`` [V/tp, H] its shard."""
    shape = target.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    wts = torch.ones_like(t, dtype=torch.float32) if weights is None else weights.reshape(-1).float()
    total, per_token = _LinearCrossEntropy.apply(h, weight, t, wts, ignore_index, chunk_rows)
    return total, per_token.view(shape)
