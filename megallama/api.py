"""The seed README's Python API, as thin faces over the real implementation.

Every face turns its objects into the Megatron-style flags of ``megallama/arguments.py`` and runs
``megallama.training.pretrain`` (the one training loop; your dataloaders go in as its ``datasets``); layouts come
from ``autoconfig.choose_layout``, the memory estimate from those same flags (``memory_args.estimate_for_args``, as
``cli train --dry-run``), strategies are ``strategies.TrainingStrategy``, the pipeline scheduler is
``pipeline.MicrobatchScheduler``. Multi-GPU training runs one process per GPU: start your script with
``torchrun --nproc_per_node N`` (the orchestrator checks the world size against its layout).

    orchestrator = quick_start("tiny_llama3_150m", strategy="standard", num_gpus=1)
    orchestrator.launch_training(train_dataloader, val_dataloader)
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import replace
from typing import List, Optional

from megallama.api_config import ConfigurationFactory, DistributedConfig, TrainingConfig  # noqa: F401  (faces)
from megallama.api_plan import gpu_memory_line, plan_vocab, planned_gpu_memory
from megallama.config import ModelConfig, get_model_config
from megallama.errors import ConfigError
from megallama.memory import estimate_requirements  # noqa: F401  (re-exported face)
from megallama.pipeline.microbatch_scheduler import MicrobatchScheduler  # noqa: F401  (re-exported face)
from megallama.strategies import TrainingStrategy

_SHAPE_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
                "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
                "max_position_embeddings": "--max-position-embeddings", "vocab_size": "--vocab-size",
                "rope_theta": "--rope-theta", "norm_eps": "--norm-epsilon", "init_method_std": "--init-method-std"}


def _strategy_argv(strategy: TrainingStrategy) -> List[str]:
    from megallama.moe_args import moe_strategy_argv
    p = strategy.parameters
    argv = ["--strategy", strategy.name]
    flags = {"lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
             "num_experts": "--num-experts", "experts_per_token": "--moe-router-topk",
             "moe_router_topk": "--moe-router-topk", "moe_aux_loss_coeff": "--moe-aux-loss-coeff",
             "moe_z_loss_coeff": "--moe-z-loss-coeff", "moe_capacity_factor": "--moe-capacity-factor",
             "moe_ffn_hidden_size": "--moe-ffn-hidden-size", "moe_layer_freq": "--moe-layer-freq"}
    for key, flag in flags.items():
        if p.get(key) is not None:
            argv += [flag, str(p[key])]
    if p.get("target_modules"):
        argv += ["--lora-target-modules", ",".join(p["target_modules"])]
    if p.get("moe_layers"):  # the seed counts layers from 1 in its examples ([4, 8, ...]); ours are 0-based
        argv += ["--moe-layers", ",".join(str(i) for i in p["moe_layers"])]
    if p.get("upcycle"):
        argv.append("--moe-upcycle")
    argv += moe_strategy_argv(p)  # Megatron's router, capacity and shared-expert flags
    if strategy.uses_moe and not p.get("num_experts"):
        argv += ["--num-experts", "8"]
    return argv


def _as_strategy(strategy) -> TrainingStrategy:
    return strategy if isinstance(strategy, TrainingStrategy) else TrainingStrategy(name=strategy or "standard")


class LlamaTrainingOrchestrator:
    """Model + strategy + layout + training settings; ``print_configuration`` and ``launch_training``.

    ``model_overrides`` changes shape fields of the named variant (e.g. a 2-layer model for CPU runs);
    ``extra_args`` are any further ``pretrain_llama.py`` flags."""

    def __init__(self, model_variant: str = "tiny_llama3_150m", training_strategy="standard", num_gpus: int = 1,
                 auto_configure: bool = True, num_nodes: int = 1, training_config: Optional[TrainingConfig] = None,
                 distributed_config: Optional[DistributedConfig] = None, gpu_memory_gb: Optional[float] = None,
                 sequence_length: Optional[int] = None, model_overrides: Optional[dict] = None,
                 extra_args: Optional[List[str]] = None):
        self.model_variant = model_variant
        self.model_overrides = dict(model_overrides or {})
        bad = sorted(set(self.model_overrides) - set(_SHAPE_FLAGS))
        if bad:
            raise ConfigError(f"model_overrides key '{bad[0]}' unknown; use {', '.join(sorted(_SHAPE_FLAGS))}")
        self.strategy = _as_strategy(training_strategy)
        # with the strategy's experts, as the loop builds it: the plan and the estimate count them
        self.model_config: ModelConfig = self.strategy.model_config(get_model_config(model_variant,
                                                                                     **self.model_overrides))
        self.num_gpus, self.num_nodes = num_gpus, num_nodes
        self.training_config = training_config or TrainingConfig(model_name=model_variant,
                                                                 sequence_length=sequence_length)
        if sequence_length and training_config is not None:
            self.training_config = replace(self.training_config, sequence_length=sequence_length)
        self.gpu_memory_gb, self.gpu_memory_source = planned_gpu_memory(gpu_memory_gb)
        self.extra_args = list(extra_args or [])
        self.plan = self._planned = self._planned_vocab = None
        # a micro-batch the user's layout fixed (a train DataLoader's batch_size must then agree: api_batch)
        self.user_microbatch_size = distributed_config.microbatch_size if distributed_config is not None else None
        if distributed_config is not None:
            self.distributed_config = distributed_config
        elif auto_configure:
            self.distributed_config = DistributedConfig()  # one process: the flags the tokenizer follows resolve
            self.distributed_config = self._auto_configure()
            self._planned = self.distributed_config  # the plan's explanation is printed while this layout stands
        else:
            self.distributed_config = DistributedConfig(data_parallel_size=num_gpus * num_nodes)

    @property
    def sequence_length(self) -> int:
        return self.training_config.sequence_length or min(self.model_config.max_position_embeddings, 2048)

    @property
    def auto_planned(self) -> bool:
        """Whether the layout is auto-configuration's plan (a DataLoader's batch is then planned again)."""
        return self._planned is not None and self.distributed_config == self._planned

    def _auto_configure(self, micro_batch_size: Optional[int] = None) -> DistributedConfig:
        from megallama.autoconfig import choose_layout, vocab_config
        world, tc = self.num_gpus * self.num_nodes, self.training_config
        kw = self.strategy.estimate_kw()
        try:  # the embedding the run builds: the flags' data follows its tokenizer (build_data), at every tp
            vocab, multiple = plan_vocab(self.build_args(1))
        except ConfigError:  # bad extra_args: said where the flags are resolved (estimate_memory, launch_training)
            vocab, multiple = plan_vocab(None)
        self.plan = choose_layout(self.model_config, world, self.gpu_memory_gb, self.sequence_length,
                                  micro_batch_size or tc.micro_batch_size, tc.batch_size, tc.precision,
                                  kw.pop("strategy"),
                                  gpus_per_node=self.num_gpus, explain=True, tokenizer_vocab=vocab,
                                  vocab_multiple=multiple, **kw)
        memory = "  " + gpu_memory_line(self.gpu_memory_gb, self.gpu_memory_source)  # as --auto-configure says it
        if self.plan is None:
            print(memory)
            return DistributedConfig(data_parallel_size=world, num_nodes=self.num_nodes)
        if vocab:  # the embedding the plan priced (build_data's padding at the plan's tp)
            self._planned_vocab = vocab_config(self.model_config, self.plan["tp"], vocab, multiple).vocab_size
        self.plan["explanation"] += "\n" + memory
        p = self.plan
        return DistributedConfig(tensor_parallel_size=p["tp"], pipeline_parallel_size=p["pp"],
                                 data_parallel_size=p["dp"], zero_stage=p["zero_stage"],
                                 expert_parallel_size=p.get("ep", 1),
                                 sequence_parallel=p["sequence_parallel"], recompute=p["recompute"],
                                 microbatch_size=p["micro_batch_size"], num_microbatches=p["num_microbatches"],
                                 num_nodes=self.num_nodes)

    # ---------------------------------------------------------------- resolved flags
    def argv(self, training_config: Optional[TrainingConfig] = None) -> List[str]:
        argv = ["--model", self.model_variant]
        for key, val in self.model_overrides.items():
            argv += [_SHAPE_FLAGS[key], str(val)]
        argv += (training_config or self.training_config).to_argv() + self.distributed_config.to_argv() + _strategy_argv(self.strategy)
        if self.training_config.sequence_length is None:
            argv += ["--seq-length", str(self.sequence_length)]
        if self.distributed_config.num_microbatches and self.training_config.batch_size is None:
            dc = self.distributed_config
            argv += ["--global-batch-size",
                     str((dc.microbatch_size or 1) * dc.data_parallel_size * dc.num_microbatches)]
        return argv + self.extra_args

    def build_args(self, world_size: Optional[int] = None, extra: Optional[List[str]] = None,
                   training_config: Optional[TrainingConfig] = None):
        from megallama.arguments import parse_args
        world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return parse_args(self.argv(training_config) + list(extra or []), world_size=world)
        except SystemExit as e:  # argparse's usage text and exit are for a command line, not a library call
            msg = (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1].replace("megallama: error: ", "")
            raise ConfigError(f"bad flags in extra_args ({msg}); see python pretrain_llama.py --help") from None

    def run_args(self):
        """(flags, vocabulary line) of the run ``launch_training`` starts on the flags' data: its model with the
        vocabulary the run builds (the tokenizer's, padded as build_data pads it), as ``cli train --dry-run``."""
        from megallama.autoconfig_args import follow_tokenizer
        args = self.build_args(self.distributed_config.world_size)
        return args, follow_tokenizer(args)

    def estimate_memory(self) -> dict:
        """Per-GPU memory of the run ``launch_training`` starts: the estimate of its resolved flags (micro- and
        global batch, precision, strategy with experts and ep, schedule, the tokenizer's vocabulary), as
        ``cli train --dry-run`` prints it."""
        return self._estimate(self.run_args()[0])

    def _estimate(self, args) -> dict:
        from megallama.memory_args import estimate_for_args
        world = self.distributed_config.world_size
        nodes = self.num_nodes if self.num_nodes > 0 and world % self.num_nodes == 0 else 1
        return estimate_for_args(args, world // nodes, nodes, self.gpu_memory_gb)

    def print_configuration(self) -> str:
        from megallama.memory import model_split
        from megallama.memory_advice import format_table
        dc, cfg = self.distributed_config, self.model_config
        try:
            args, vocab_line = self.run_args()
            cfg = cfg.replace(vocab_size=args.model_config.vocab_size)  # the embedding the run builds
        except ConfigError as e:
            args, vocab_line, bad = None, f"vocabulary: {cfg.vocab_size} (the model's; flags unresolved)", e
        params = sum(model_split(cfg, **self.strategy.estimate_kw()))
        lines = [f"model: {self.model_variant} ({params / 1e9:.3f}B params, {cfg.num_layers} layers, hidden "
                 f"{cfg.hidden_size}, vocab {cfg.vocab_size})",
                 vocab_line,
                 f"strategy: {self.strategy.name} {self.strategy.parameters or ''}".rstrip(),
                 f"layout: {dc.world_size} GPU{'s' * (dc.world_size != 1)} = tp {dc.tensor_parallel_size} x pp "
                 f"{dc.pipeline_parallel_size} x dp "
                 f"{dc.data_parallel_size}{' (+sp)' if dc.sequence_parallel else ''}"
                 f"{f', experts over ep {dc.expert_parallel_size}' if dc.expert_parallel_size > 1 else ''}, "
                 f"ZeRO-{dc.zero_stage}, "
                 f"recompute {dc.recompute}, schedule {dc.pipeline_schedule}",
                 "flags: " + " ".join(self.argv())]
        if self.plan is not None and "explanation" in self.plan and self.distributed_config == self._planned:
            lines += ["", self.plan["explanation"]]  # ends with the GPU memory line
        else:
            lines.insert(4, gpu_memory_line(self.gpu_memory_gb, self.gpu_memory_source))
        try:
            if args is None:
                raise bad
            lines += ["", format_table(self._estimate(args))]
        except ConfigError as e:
            lines += ["", f"memory estimate unavailable: {e}"]
        text = "\n".join(lines)
        print(text)
        return text

    # ---------------------------------------------------------------- training
    def launch_training(self, train_dataloader=None, val_dataloader=None, train_iters: Optional[int] = None,
                        **flags) -> dict:
        """Train with ``pretrain``; data: your dataloaders (see ``api_data``; the train DataLoader's batch size is the
        micro-batch per rank: ``api_batch``), else the flags' data (``--data-path``, ``--mock-data``), else the
        bundled corpus. Returns pretrain's summary (losses per iteration, ...)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.distributed_config.world_size:
            raise ConfigError(f"this layout needs {self.distributed_config.world_size} processes but {world} are "
                              f"running; start the script with torchrun --nproc_per_node "
                              f"{self.distributed_config.world_size // max(1, self.num_nodes)}")
        extra = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                 for k, v in flags.items() if v is not False and v is not None]
        run = None
        if train_iters:  # the call's length replaces the config's (--train-iters and --epochs exclude each other)
            extra += ["--train-iters", str(train_iters)]
            run = replace(self.training_config, train_iters=None, epochs=None)
        args = self.build_args(world, extra, run)
        from megallama.training import pretrain
        if train_dataloader is None:
            return pretrain(args)
        from megallama.api_batch import batch_notes, follow_dataloader_batch, repeat_notes
        from megallama.api_data import UserDataset
        from megallama.api_plan import dataloader_vocab_note
        from megallama.training_setup import iters_for_epochs
        train = UserDataset(train_dataloader, args.seq_length, args.model_config.vocab_size, "train")
        before = None
        if train.batch_size and follow_dataloader_batch(self, train.batch_size, extra):
            before, args = args.micro_batch_size, self.build_args(world, extra, run)
        dataloader_vocab_note(self._planned_vocab, args.model_config.vocab_size)
        valid = None if val_dataloader is None else \
            UserDataset(val_dataloader, args.seq_length, args.model_config.vocab_size, "validation")
        epochs = None
        if args.train_iters is None or (self.training_config.epochs and not train_iters):
            epochs = self.training_config.epochs or 1.0
            args.train_iters = iters_for_epochs(args, len(train), epochs)
        if train.shuffle:
            args.dataloader_type = "cyclic"
        if valid is not None and not args.eval_interval:
            args.eval_interval = max(1, args.train_iters)
        batch_notes(self, args, train, before)
        repeat_notes(args, train, valid, epochs)
        return pretrain(args, datasets=(train, valid))


# ---------------------------------------------------------------- the seed's constructors
def quick_start(model_variant: str = "tiny_llama3_150m", strategy="standard", num_gpus: int = 1,
                **kw) -> LlamaTrainingOrchestrator:
    """An auto-configured orchestrator, its configuration printed."""
    orch = LlamaTrainingOrchestrator(model_variant, strategy, num_gpus=num_gpus, auto_configure=True, **kw)
    orch.print_configuration()
    return orch


def create_tiny_llama3_orchestrator(size: str = "50m", num_gpus: int = 1, strategy="standard",
                                    **kw) -> LlamaTrainingOrchestrator:
    if str(size).lower() not in ("50m", "150m"):
        raise ConfigError(f"tiny Llama 3 size '{size}' unknown; use '50m' or '150m'")
    return LlamaTrainingOrchestrator(f"tiny_llama3_{str(size).lower()}", strategy, num_gpus=num_gpus, **kw)


def create_llama3_8b_orchestrator(num_gpus: int = 4, strategy="standard", instruct: bool = False,
                                  **kw) -> LlamaTrainingOrchestrator:
    return LlamaTrainingOrchestrator("llama3_8b_instruct" if instruct else "llama3_8b", strategy, num_gpus=num_gpus,
                                     **kw)


def create_llama3_70b_orchestrator(num_gpus: int = 8, strategy="standard", instruct: bool = False,
                                   **kw) -> LlamaTrainingOrchestrator:
    return LlamaTrainingOrchestrator("llama3_70b_instruct" if instruct else "llama3_70b", strategy,
                                     num_gpus=num_gpus, **kw)


def create_llama3_405b_orchestrator(num_gpus: int = 64, strategy="standard", **kw) -> LlamaTrainingOrchestrator:
    """The seed says 64 GPUs give tp 8 x pp 8 x ZeRO-3; with dp = 1 that shards nothing and 405B needs
    > 100 GiB/GPU of model states: auto-configuration explains that and names a GPU count that fits."""
    if num_gpus > 8 and num_gpus % 8:  # 12 GPUs planned as one node of 8
        raise ConfigError(f"num_gpus {num_gpus} is not whole nodes of 8 GPUs; pass a multiple of 8")
    return LlamaTrainingOrchestrator("llama3_405b", strategy, num_gpus=min(num_gpus, 8),
                                     num_nodes=max(1, num_gpus // 8), **kw)


from megallama.api_trainer import (DistributedTrainer, ParallelLlamaModel, create_distributed_trainer,  # noqa: E402,F401
                                   create_llama_7b_parallel)


__all__ = ["quick_start", "create_tiny_llama3_orchestrator", "create_llama3_8b_orchestrator",
           "create_llama3_70b_orchestrator", "create_llama3_405b_orchestrator", "LlamaTrainingOrchestrator",
           "TrainingStrategy", "TrainingConfig", "DistributedConfig", "ConfigurationFactory", "estimate_requirements",
           "MicrobatchScheduler", "create_distributed_trainer", "create_llama_7b_parallel", "ParallelLlamaModel",
           "DistributedTrainer"]
