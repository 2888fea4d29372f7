"""Cross-entropy over vocabulary-parallel logits, without gathering the full [tokens, vocab] logits.

Each tp rank holds logits for its vocab shard: the max and the sum of exponentials are all-reduced (a scalar per
token), the target logit comes from the rank that owns it. Computed in fp32; backward is softmax - one_hot on
the local shard.
"""
import torch
import torch.distributed as dist

from megallama.mpu import parallel_state as ps


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
        input_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 math (fp64 stays fp64)
        logits_max = logits.max(dim=-1)[0]
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)
        part = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * part
        valid = target != ignore_index
        local_t = target - start
        in_shard = (local_t >= 0) & (local_t < part) & valid
        local_t = local_t.masked_fill(~in_shard, 0)
        flat = logits.view(-1, part)
        idx = torch.arange(flat.shape[0], device=logits.device)
        predicted = flat[idx, local_t.view(-1)].view_as(target).masked_fill(~in_shard, 0.0)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            dist.all_reduce(predicted, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = (sum_exp.log() - predicted).masked_fill(~valid, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, in_shard, local_t, valid)
        ctx.input_dtype = input_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, in_shard, local_t, valid = ctx.saved_tensors
        grad = softmax
        flat = grad.view(-1, grad.shape[-1])
        idx = torch.arange(flat.shape[0], device=grad.device)
        flat[idx, local_t.view(-1)] -= in_shard.view(-1).float()
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100):
    """Per-token loss [...]; ``logits`` [..., vocab/tp] is this rank's shard (any dtype; math in fp32)."""
    return _VocabParallelCrossEntropy.apply(logits, target, ignore_index)
