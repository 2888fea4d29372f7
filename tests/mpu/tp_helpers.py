"""Shared bits of the tensor-parallel tests: tiny configs and gathering sharded tensors back to full."""
import torch
import torch.distributed as dist

from megallama.config import ModelConfig
from megallama.mpu import parallel_state as ps

# hidden 64, 4 heads: tp=4 needs 4 kv heads; the GQA variant (2 kv heads, tied embeddings) runs at tp <= 2.
MHA = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=4,
                  vocab_size=256, max_position_embeddings=64, rope_theta=10000.0)
GQA_TIED = MHA.replace(num_query_groups=2, tie_word_embeddings=True)


def gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate the tp ranks' ``t`` along ``dim`` (plain all_gather: no autograd)."""
    n = ps.get_tensor_model_parallel_world_size()
    if n == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def full_tensor(param: torch.nn.Parameter, t: torch.Tensor = None) -> torch.Tensor:
    """The full (unsharded) value of ``t`` (default: the parameter itself) laid out like ``param``."""
    t = param if t is None else t
    if getattr(param, "tensor_model_parallel", False):
        return gather_tp(t, param.partition_dim)
    return t.detach().clone()


def full_state(model, grads: bool = False) -> dict:
    """{name: full tensor} of the parameters (or of their grads), as numpy arrays for the trip to the parent."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        out[name] = full_tensor(p, t).numpy()
    return out
