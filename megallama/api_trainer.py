"""The seed's manual-trainer faces: ``create_llama_7b_parallel`` (a model spec) and ``create_distributed_trainer``
(``.fit()``), both running the one training loop through ``LlamaTrainingOrchestrator``."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from megallama.api import DistributedConfig, LlamaTrainingOrchestrator, TrainingConfig
from megallama.config import ModelConfig, get_model_config
from megallama.errors import ConfigError


@dataclass
class ParallelLlamaModel:
    """What ``create_llama_7b_parallel`` returns: a model spec the trainer builds on each rank (``build()`` gives
    the ``LlamaForCausalLM`` itself, on the meta device unless told otherwise)."""
    model_variant: str = "llama2_7b"
    tensor_parallel_size: int = 1
    use_flash_attention: bool = True
    use_checkpointing: bool = False
    model_overrides: dict = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return get_model_config(self.model_variant, **self.model_overrides)

    def build(self, device="meta", dtype=None):
        import torch
        from megallama.model import build_model
        return build_model(self.config, device=device, dtype=dtype or torch.float32)


def create_llama_7b_parallel(tensor_parallel_size: int = 1, use_flash_attention: bool = True,
                             use_checkpointing: bool = False, model_variant: str = "llama2_7b",
                             **model_overrides) -> ParallelLlamaModel:
    """Attention always runs through SDPA's flash / cuDNN / memory-efficient kernels; ``use_flash_attention``
    is accepted for the seed's sake. ``use_checkpointing`` selects full recompute."""
    if not use_flash_attention:
        import warnings
        warnings.warn("use_flash_attention=False is ignored: attention always uses SDPA's fused kernels")
    return ParallelLlamaModel(model_variant, tensor_parallel_size, use_flash_attention, use_checkpointing,
                              dict(model_overrides))


def spec_of_config(cfg: ModelConfig) -> ParallelLlamaModel:
    """A ModelConfig as the named variant plus overrides that the training flags express (the loop builds its model
    from flags); one error line naming the fields they cannot (it trained the variant's shape instead)."""
    import dataclasses

    from megallama.api import _SHAPE_FLAGS
    from megallama.config import MODEL_REGISTRY
    base = cfg.name if cfg.name in MODEL_REGISTRY else {"llama1": "llama1_7b", "llama2": "llama2_7b",
                                                        "code_llama": "code_llama_7b"}.get(cfg.family)
    base = base or ("tiny_llama3_50m" if cfg.tie_word_embeddings else "llama3_8b")
    overrides = {k: getattr(cfg, k) for k in _SHAPE_FLAGS}
    built = get_model_config(base, **overrides)
    differ = [f.name for f in dataclasses.fields(cfg) if f.name != "name" and getattr(built, f.name) !=
              getattr(cfg, f.name)]
    if differ:
        raise ConfigError(f"this ModelConfig's {', '.join(differ)} differ from {base}'s and no training flag sets "
                          f"them; start from a named variant (model_overrides for its shape, training_strategy for "
                          "experts)")
    return ParallelLlamaModel(base, model_overrides=overrides)


TRAINER_TYPES = ("standard", "adaptive", "data_parallel", "tensor_parallel", "pipeline", "hybrid", "zero")


class DistributedTrainer:
    """``.fit(train_dataloader=None, val_dataloader=None)`` runs the training loop with the given model spec,
    training config and layout (every trainer_type runs the same loop; the layout decides the parallelism)."""

    def __init__(self, model, config: TrainingConfig, distributed_config: Optional[DistributedConfig] = None,
                 trainer_type: str = "standard"):
        if trainer_type not in TRAINER_TYPES:
            raise ConfigError(f"trainer_type '{trainer_type}' unknown; choose one of {', '.join(TRAINER_TYPES)}")
        if isinstance(model, str):
            model = ParallelLlamaModel(model)
        elif isinstance(model, ModelConfig):
            model = spec_of_config(model)
        if not isinstance(model, ParallelLlamaModel):
            raise ConfigError("create_distributed_trainer takes a model from create_llama_7b_parallel, a variant name "
                              "or a ModelConfig")
        dc = distributed_config or DistributedConfig(tensor_parallel_size=model.tensor_parallel_size,
                                                     sequence_parallel=model.tensor_parallel_size > 1)
        if model.use_checkpointing and dc.recompute == "none":
            dc = replace(dc, recompute="full")
        self.model, self.trainer_type = model, trainer_type
        self.orchestrator = LlamaTrainingOrchestrator(model.model_variant, "standard", num_gpus=dc.world_size,
                                                      auto_configure=False, training_config=config,
                                                      distributed_config=dc, model_overrides=model.model_overrides)

    def fit(self, train_dataloader=None, val_dataloader=None, **flags) -> dict:
        return self.orchestrator.launch_training(train_dataloader, val_dataloader, **flags)


def create_distributed_trainer(model, config: TrainingConfig, distributed_config: Optional[DistributedConfig] = None,
                               trainer_type: str = "standard") -> DistributedTrainer:
    return DistributedTrainer(model, config, distributed_config, trainer_type)
