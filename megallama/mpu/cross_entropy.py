"""Cross-entropy over vocabulary-parallel logits, without gathering the full [tokens, vocab] logits.

Each tp rank holds logits for its vocab shard: the max and the sum of exponentials are all-reduced (a scalar per
token), the target logit comes from the rank that owns it. Computed in fp32; backward is softmax - one_hot on
the local shard. The signature is Megatron-core's ``(vocab_parallel_logits, target, label_smoothing=0.0)``;
label smoothing follows ``F.cross_entropy`` over the full vocabulary (one more scalar all-reduce per token).
Megatron-core's own formula differs slightly: it spreads the mass over the V - 1 non-target classes and takes
the mean log-probability of the local shard only, so its smoothed loss depends on tp.

Memory: the softmax kept for backward becomes the gradient in place (as in Megatron-core), so no second
[tokens, vocab/tp] buffer is ever allocated. The price, also Megatron-core's: the graph can be backpropagated
once; a second backward (``retain_graph=True``) raises torch's in-place-modification error. Recompute the loss
for a second backward.

Targets outside [0, vocab) other than ``ignore_index`` are an error, as in ``F.cross_entropy``. On CPU the check
raises a ``ValueError`` naming the value. On CUDA it is a device-side assert (``torch._assert_async``, torch's own
CUDA behaviour for such targets): a few kernels on the [tokens] target, never a host sync in the training step.
"""
import torch
import torch.distributed as dist

from megallama.mpu import parallel_state as ps


def _check_targets(target: torch.Tensor, ignore_index: int, vocab: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    what = (f"vocab_parallel_cross_entropy: targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
            "fix the labels (or pass ignore_index=...)")
    if target.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{what}: got {int(target[bad][0])}")
    elif not torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), what)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, ignore_index):
        tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
        part = logits.shape[-1]
        vocab = part * tp
        _check_targets(target, ignore_index, vocab)  # before any collective: every tp rank raises alike
        input_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 math (fp64 stays fp64)
        logits_max = logits.max(dim=-1)[0]
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)  # a new tensor, any layout (non-contiguous input kept as is)
        start = ps.get_tensor_model_parallel_rank() * part
        valid = target != ignore_index
        local_t = target - start
        in_shard = (local_t >= 0) & (local_t < part) & valid
        local_t = local_t.masked_fill(~in_shard, 0)
        predicted = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)
        sum_logits = logits.sum(dim=-1) if label_smoothing > 0 else None
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            dist.all_reduce(predicted, group=group)
            dist.all_reduce(sum_exp, group=group)
            if sum_logits is not None:
                dist.all_reduce(sum_logits, group=group)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - predicted
        if sum_logits is not None:
            # torch's definition: (1 - e) * nll + e * mean over the full vocab of -log p
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_sum_exp - sum_logits / vocab)
        loss = loss.masked_fill(~valid, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward (and turned into the gradient there)
        ctx.save_for_backward(exp, in_shard, local_t, valid)
        ctx.input_dtype, ctx.label_smoothing, ctx.vocab = input_dtype, label_smoothing, vocab
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, in_shard, local_t, valid = ctx.saved_tensors
        grad = softmax  # in place: see the module docstring
        eps = ctx.label_smoothing
        hit = in_shard.to(grad.dtype).neg_()
        if eps > 0:
            hit.mul_(1.0 - eps)
            grad.sub_(eps / ctx.vocab)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), hit.unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, *, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [...]; ``vocab_parallel_logits`` [..., vocab/tp] is this rank's shard (any dtype and layout;
    math in fp32). ``label_smoothing`` as ``F.cross_entropy``'s, over the full vocabulary; ``ignore_index``
    positions get loss 0 and no gradient."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}; ignore_index is keyword-only "
                         "(vocab_parallel_cross_entropy(logits, target, ignore_index=...))")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(vocab_parallel_logits.shape)} need a target "
                         f"of shape {tuple(vocab_parallel_logits.shape[:-1])}, got {tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, float(label_smoothing), ignore_index)
