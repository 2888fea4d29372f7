"""megallama: Megatron-style Llama training with 3D parallelism.

The seed README's Python API is exported here lazily (importing ``megallama`` stays cheap):
``quick_start``, ``create_*_orchestrator``, ``LlamaTrainingOrchestrator``, ``TrainingStrategy``, ``TrainingConfig``,
``ConfigurationFactory``, ``estimate_requirements``, ``validate_environment``, ``PerformanceBenchmark``,
``MicrobatchScheduler``, ``create_distributed_trainer``, ``create_llama_7b_parallel``. See ``megallama/api.py``.
Sampling from a checkpoint: ``load_for_generation``, ``generate_text``, ``SamplingConfig``
(``megallama/generation_cli.py``).
"""
import importlib

_EXPORTS = {
    "quick_start": "megallama.api", "create_tiny_llama3_orchestrator": "megallama.api",
    "create_llama3_8b_orchestrator": "megallama.api", "create_llama3_70b_orchestrator": "megallama.api",
    "create_llama3_405b_orchestrator": "megallama.api", "LlamaTrainingOrchestrator": "megallama.api",
    "TrainingConfig": "megallama.api", "DistributedConfig": "megallama.api", "ConfigurationFactory": "megallama.api",
    "create_distributed_trainer": "megallama.api", "create_llama_7b_parallel": "megallama.api",
    "TrainingStrategy": "megallama.strategies", "estimate_requirements": "megallama.memory",
    "validate_environment": "megallama.environment", "PerformanceBenchmark": "megallama.benchmarking",
    "MicrobatchScheduler": "megallama.pipeline.microbatch_scheduler", "choose_layout": "megallama.autoconfig",
    "load_for_generation": "megallama.generation_cli", "generate_text": "megallama.generation_cli",
    "SamplingConfig": "megallama.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megallama' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
