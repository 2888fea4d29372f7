"""RMSNorm module (HF name ``weight``) over the fused/reference op."""
import torch
import torch.nn as nn

from megallama.ops import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.weight.init_std = None  # ones
        # Replicated over tp but fed sequence shards under SP: its grad must be all-reduced over tp.
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)
