"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate/up column-parallel, down row-parallel.

gate/up share one input all-gather (SP) / one grad all-reduce (TP) through ``column_parallel_linears``."""
import torch.nn as nn

from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, column_parallel_linears
from megallama.ops import swiglu


class LlamaMLP(nn.Module):
    def __init__(self, config, sequence_parallel: bool = False, device=None, dtype=None, ffn_hidden_size=None):
        super().__init__()
        h, f = config.hidden_size, ffn_hidden_size or config.ffn_hidden_size
        out_std = config.init_method_std / (2.0 * config.num_layers) ** 0.5
        kw = dict(bias=False, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.gate_proj = ColumnParallelLinear(h, f, init_std=config.init_method_std, **kw)
        self.up_proj = ColumnParallelLinear(h, f, init_std=config.init_method_std, **kw)
        self.down_proj = RowParallelLinear(f, h, init_std=out_std, **kw)
        self.recompute_activation = False

    def forward(self, x):
        gate, up = column_parallel_linears(x, (self.gate_proj, self.up_proj))
        if self.recompute_activation and gate.requires_grad:
            from torch.utils.checkpoint import checkpoint
            act = checkpoint(swiglu, gate, up, use_reentrant=False)
        else:
            act = swiglu(gate, up)
        return self.down_proj(act)
