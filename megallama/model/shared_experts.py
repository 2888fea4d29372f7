"""The MoE layer's shared expert: a dense SwiGLU MLP every token goes through (``LlamaMLP``, tensor-parallel like
it), with Megatron's optional sigmoid gate (``--moe-shared-expert-gate``, Qwen2-MoE's ``shared_expert_gate``):

    out = sigmoid(x @ gate_weight.T) * mlp(x),    gate_weight: [1, h]

as ``SharedExpertMLP.forward`` in Megatron-Core. The gate weight is replicated over tp (one logit per token needs
the whole h): without sequence parallelism every tp rank sees the whole sequence and computes the whole gradient;
under SP each rank sees its s/tp tokens, so its gradient is partial and is summed over tp like a norm weight's
(``sequence_parallel = True``). Its name is Megatron's, ``mlp.shared_experts.gate_weight``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megallama.model.mlp import LlamaMLP


class SharedExpertMLP(LlamaMLP):
    def __init__(self, config, sequence_parallel: bool = False, device=None, dtype=None, ffn_hidden_size=None,
                 gate: bool = False):
        super().__init__(config, sequence_parallel, device, dtype, ffn_hidden_size=ffn_hidden_size)
        self.gate_weight = None
        if gate:
            self.gate_weight = nn.Parameter(torch.empty(1, config.hidden_size, device=device, dtype=dtype))
            self.gate_weight.init_std = config.init_method_std  # Megatron: config.init_method
            self.gate_weight.sequence_parallel = sequence_parallel

    def forward(self, x):
        out = super().forward(x)
        if self.gate_weight is None:
            return out
        w = self.gate_weight
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts both to the compute dtype
            w = w.to(x.dtype)
        return out * torch.sigmoid(F.linear(x, w))
