"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Weights are stored as the local shard; each parameter carries ``tensor_model_parallel``, ``partition_dim`` so
that initialisation (``megallama.mpu.random.init_parameter``), checkpoint resharding and HF conversion can
rebuild the full tensor. With ``sequence_parallel`` the column layer all-gathers its [b, s/tp, h] input and the
row layer reduce-scatters its output back to sequence shards.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu import mappings


def set_tensor_model_parallel_attributes(param: nn.Parameter, is_parallel: bool, dim: int) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ConfigError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}; "
                          "choose --tensor-model-parallel-size dividing it")
    return numerator // denominator


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by columns (output features) over tp ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 sequence_parallel: bool = False, init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, tp, "output size")
        self.gather_output, self.sequence_parallel, self.init_std = gather_output, sequence_parallel, init_std
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, 0)
        self.weight.init_std = init_std
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, device=device, dtype=dtype))
            set_tensor_model_parallel_attributes(self.bias, tp > 1, 0)
            self.bias.init_std = 0.0
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, True)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x)
        y = F.linear(x, w, self.bias)
        if self.gather_output:
            y = mappings.gather_from_tensor_model_parallel_region(y)
        return y

    def extra_repr(self):
        return f"in={self.input_size}, out={self.output_size} (local {self.output_size_per_partition})"


class RowParallelLinear(nn.Module):
    """Y = X A with A split by rows (input features); partial outputs are summed over tp."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, tp, "input size")
        self.input_is_parallel, self.sequence_parallel, self.init_std = input_is_parallel, sequence_parallel, init_std
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, 1)
        self.weight.init_std = init_std
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, device=device, dtype=dtype))
            self.bias.init_std = 0.0
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self):
        return f"in={self.input_size} (local {self.input_size_per_partition}), out={self.output_size}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; out-of-shard tokens give zeros, then all-reduce over tp."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02, sequence_parallel=False,
                 device=None, dtype=None):
        super().__init__()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_partition = divide(num_embeddings, tp, "vocabulary size")
        self.vocab_start = rank * self.per_partition
        self.vocab_end = self.vocab_start + self.per_partition
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(self.per_partition, embedding_dim, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, 0)
        self.weight.init_std = init_std

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tp = ps.get_tensor_model_parallel_world_size()
        if tp == 1:
            out = F.embedding(input_ids, self.weight)
            return mappings.scatter_to_sequence_parallel_region(out) if self.sequence_parallel else out
        mask = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(mask, 0)
        out = F.embedding(local, self.weight).masked_fill(mask.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out)
        return mappings.reduce_from_tensor_model_parallel_region(out)
