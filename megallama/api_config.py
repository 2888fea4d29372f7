"""The Python API's settings objects (the seed README's ``TrainingConfig``, ``DistributedConfig`` and
``ConfigurationFactory``): plain dataclasses that become Megatron-style flags (``to_argv``), so the API and the CLI
train, plan and estimate the same run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megallama.errors import ConfigError


def cuda_visible() -> bool:
    """Whether this process sees a GPU (the defaults of precision and plans follow it)."""
    import torch
    return torch.cuda.is_available()


@dataclass
class TrainingConfig:
    """The seed's training settings. ``batch_size`` is the global batch (sequences per optimizer step)."""
    model_name: str = "custom"
    batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    learning_rate: float = 3e-4
    epochs: Optional[float] = None
    train_iters: Optional[int] = None
    sequence_length: Optional[int] = None
    mixed_precision: Optional[str] = None  # bf16 / fp16 / fp32; default bf16 on GPU, fp32 on CPU
    fp8_format: Optional[str] = None  # Megatron's --fp8-format: "hybrid" or "e4m3" (decoder linears; needs bf16)
    fp8_recipe: Optional[str] = None  # Megatron's --fp8-recipe: "delayed" (its default) or "tensorwise" (here's)
    decoupled_lr: Optional[float] = None  # Megatron's --decoupled-lr: the embedding and output layer's peak LR
    decoupled_min_lr: Optional[float] = None  # ... and its floor (default: the run's min LR)
    grad_reduce_in_bf16: bool = False  # Megatron's --grad-reduce-in-bf16: a bf16 gradient buffer (needs bf16)
    async_save: bool = False  # Megatron's --async-save: checkpoints written in the background (needs save_dir)
    weight_decay: float = 0.1
    gradient_clipping: float = 1.0
    warmup_iters: Optional[int] = None
    seed: int = 1234
    save_dir: Optional[str] = None
    save_interval: Optional[int] = None
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_iters: int = 2

    @property
    def precision(self) -> str:
        """The run's bf16 / fp16 / fp32 (what it trains, plans and estimates with)."""
        prec = self.mixed_precision or ("bf16" if cuda_visible() else "fp32")
        prec = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(prec, prec)
        if prec not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"mixed_precision '{prec}' is not bf16, fp16 or fp32; pick one of those")
        return prec

    def to_argv(self) -> List[str]:
        argv = ["--lr", str(self.learning_rate), "--weight-decay", str(self.weight_decay), "--clip-grad",
                str(self.gradient_clipping), "--seed", str(self.seed), "--log-interval", str(self.log_interval),
                "--eval-iters", str(self.eval_iters), "--mixed-precision", self.precision]
        for flag, val in (("--global-batch-size", self.batch_size), ("--micro-batch-size", self.micro_batch_size),
                          ("--train-iters", self.train_iters), ("--epochs", self.epochs),
                          ("--seq-length", self.sequence_length), ("--lr-warmup-iters", self.warmup_iters),
                          ("--save", self.save_dir), ("--save-interval", self.save_interval),
                          ("--eval-interval", self.eval_interval), ("--fp8-format", self.fp8_format),
                          ("--fp8-recipe", self.fp8_recipe), ("--decoupled-lr", self.decoupled_lr),
                          ("--decoupled-min-lr", self.decoupled_min_lr)):
            if val is not None:
                argv += [flag, str(val)]
        argv += [flag for flag, on in (("--grad-reduce-in-bf16", self.grad_reduce_in_bf16),
                                       ("--async-save", self.async_save)) if on]
        return argv


@dataclass
class DistributedConfig:
    """A parallel layout: tp x pp x dp (x cp) GPUs, ZeRO stage, schedule, micro-batch."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_parallel_size: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"
    microbatch_size: Optional[int] = None
    num_microbatches: Optional[int] = None
    recompute: str = "none"
    gradient_compression: str = "none"
    num_nodes: int = 1

    @property
    def world_size(self) -> int:
        return (self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size *
                self.context_parallel_size)

    def to_argv(self) -> List[str]:
        argv = ["--tensor-model-parallel-size", str(self.tensor_parallel_size), "--pipeline-model-parallel-size",
                str(self.pipeline_parallel_size), "--context-parallel-size", str(self.context_parallel_size),
                "--expert-model-parallel-size", str(self.expert_parallel_size), "--zero-stage",
                str(self.zero_stage), "--pipeline-schedule", self.pipeline_schedule,
                "--gradient-compression", self.gradient_compression]
        if self.sequence_parallel and self.tensor_parallel_size > 1:
            argv.append("--sequence-parallel")
        if self.recompute != "none":
            argv += ["--recompute-granularity", self.recompute]
        if self.microbatch_size:
            argv += ["--micro-batch-size", str(self.microbatch_size)]
        return argv


class ConfigurationFactory:
    """The seed's layout constructors."""

    @staticmethod
    def create_data_parallel_config(num_gpus: int = 1, zero_stage: int = 0, **kw) -> DistributedConfig:
        return DistributedConfig(data_parallel_size=num_gpus, zero_stage=zero_stage, **kw)

    @staticmethod
    def create_tensor_parallel_config(num_gpus: Optional[int] = None, tensor_parallel_size: Optional[int] = None,
                                      sequence_parallel: bool = True, **kw) -> DistributedConfig:
        tp = tensor_parallel_size or num_gpus or 1
        if num_gpus and num_gpus % tp:  # the rest was dropped: a layout of fewer GPUs than asked
            raise ConfigError(f"num_gpus {num_gpus} is not a multiple of tensor_parallel_size {tp}; pick a tp "
                              "dividing the GPU count")
        dp = max(1, (num_gpus or tp) // tp)
        return DistributedConfig(tensor_parallel_size=tp, data_parallel_size=dp, sequence_parallel=sequence_parallel,
                                 **kw)

    @staticmethod
    def create_pipeline_parallel_config(pipeline_stages: int = 2, microbatch_size: int = 1, schedule: str = "1f1b",
                                        num_microbatches: Optional[int] = None, data_parallel_size: int = 1,
                                        **kw) -> DistributedConfig:
        return DistributedConfig(pipeline_parallel_size=pipeline_stages, microbatch_size=microbatch_size,
                                 pipeline_schedule=schedule, num_microbatches=num_microbatches,
                                 data_parallel_size=data_parallel_size, **kw)

    @staticmethod
    def create_hybrid_parallel_config(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                                      data_parallel_size: int = 1, use_zero: bool = False, zero_stage: int = 1,
                                      sequence_parallel: Optional[bool] = None, **kw) -> DistributedConfig:
        return DistributedConfig(tensor_parallel_size=tensor_parallel_size,
                                 pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size,
                                 zero_stage=zero_stage if use_zero else 0,
                                 sequence_parallel=tensor_parallel_size > 1 if sequence_parallel is None
                                 else sequence_parallel, **kw)
