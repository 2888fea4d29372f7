"""Shared bits of the strategy tests: a tiny config, batches, and gathering sharded params/grads to full tensors."""
import torch
import torch.distributed as dist

from megallama.config import ModelConfig
from megallama.mpu import parallel_state as ps

# GQA with 2 kv heads: tp <= 2. Sequence 16 splits over tp = 2 for sequence parallelism.
TINY = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                   vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)
SEQ = 16


def batch(n: int, seed: int = 0, vocab: int = 128, seq: int = SEQ):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _gather(t: torch.Tensor, dim: int, group, n: int) -> torch.Tensor:
    if n == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_tensor(p: torch.nn.Parameter, t: torch.Tensor) -> torch.Tensor:
    """Undo the tp split (``partition_dim``) and, for experts, the ep split (dim 0)."""
    if getattr(p, "tensor_model_parallel", False):
        t = _gather(t, p.partition_dim, ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size())
    if getattr(p, "expert_parallel", False):
        t = _gather(t, 0, ps.get_expert_model_parallel_group(), ps.get_expert_model_parallel_world_size())
    return t.detach().clone()


def reduced_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """The data-parallel reduction the DDP wrapper must do: dense grads average over dp; expert grads (already
    summed over ep by the all-to-all backward) sum over the expert-data-parallel group and scale by 1/dp."""
    g = p.grad.detach().clone()
    dp = ps.get_data_parallel_world_size()
    if getattr(p, "expert_parallel", False):
        if ps.get_expert_data_parallel_world_size() > 1:
            dist.all_reduce(g, group=ps.get_expert_data_parallel_group())
    elif dp > 1:
        dist.all_reduce(g, group=ps.get_data_parallel_group())
    return g / dp


def full_params_and_grads(model, grads=True):
    out = {}
    for name, p in model.named_parameters():
        out[name] = full_tensor(p, p).numpy()
        if grads and p.grad is not None:
            out[name + ".grad"] = full_tensor(p, reduced_grad(p)).numpy()
    return out


def reduce_like_ddp(model, loss: torch.Tensor, ep: int) -> tuple:
    """After a dp x cp x ep rank's backward: the gradient reductions of the DDP wrapper (SP grads over tp; mean over
    dp x cp; experts summed over expert-dp and scaled by 1/dp) and the mean loss. Returns (loss, full grads on
    rank 0 else None)."""
    from megallama.mpu import allreduce_sequence_parallel_gradients
    allreduce_sequence_parallel_gradients(model)
    dp, cp = ps.get_data_parallel_world_size(), ps.get_context_parallel_world_size()
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    for p in model.parameters():
        if ep > 1 and getattr(p, "expert_parallel", False):
            if ps.get_expert_data_parallel_world_size() > 1:
                dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())
            p.grad /= dp
        elif dp * cp > 1:
            dist.all_reduce(p.grad, group=dp_cp)
            p.grad /= dp * cp
    if dp * cp > 1:
        dist.all_reduce(loss, group=dp_cp)
    grads = {n: full_tensor(p, p.grad).numpy() for n, p in model.named_parameters()}
    return float(loss) / (dp * cp), grads if dist.get_rank() == 0 else None
