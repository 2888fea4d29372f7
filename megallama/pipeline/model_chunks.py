"""Build this rank's model chunks for a pipeline schedule: which layers, embedding and head each chunk holds."""
from __future__ import annotations

from typing import List, Optional

import torch

from megallama.config import ModelConfig
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.pipeline.partition import costs_from_config, partition_layers, virtual_chunks
from megallama.pipeline.schedules import chunk_parts, normalize_schedule_name


def unwrap_model(model):
    """The LlamaForCausalLM inside DDP/ZeRO wrappers (they keep it as ``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "set_input_tensor"):
        model = model.module
    return model


def model_parts(config: ModelConfig, num_stages: int, schedule: str, num_layers_per_virtual_stage=None,
                first_stage_num_layers=None, last_stage_num_layers=None, seq_length=None) -> List[List[int]]:
    """Layer ids of every model part for ``schedule`` (cost-balanced unless the virtual stage size fixes them)."""
    name = normalize_schedule_name(schedule)
    L = config.num_layers
    if name == "interleaved" and num_stages > 1:
        pinned = [f for f, n in (("first", first_stage_num_layers), ("last", last_stage_num_layers)) if n is not None]
        if pinned:  # Megatron refuses them with --num-layers-per-virtual-pipeline-stage too; never drop them
            raise ConfigError(f"--decoder-{pinned[0]}-pipeline-num-layers cannot be combined with the interleaved "
                              "schedule (its virtual stages are equal chunks here); drop one of them")
        v = virtual_chunks(L, num_stages, num_layers_per_virtual_stage)
        n = L // (num_stages * v)
        return [list(range(k * n, (k + 1) * n)) for k in range(num_stages * v)]
    return partition_layers(L, num_stages, 1, costs=costs_from_config(config, seq_length),
                            first_stage_num_layers=first_stage_num_layers, last_stage_num_layers=last_stage_num_layers)


def build_model_chunks(config: ModelConfig, *, device="cpu", dtype=torch.float32, seed: int = 1234,
                       sequence_parallel: bool = False, schedule: str = "1f1b",
                       num_layers_per_virtual_stage: Optional[int] = None, first_stage_num_layers: Optional[int] = None,
                       last_stage_num_layers: Optional[int] = None, init: bool = True) -> list:
    """This rank's chunks, in the order the schedule names them: one for GPipe/1F1B/ZB-H1, ``v`` for interleaved
    (chunk c = part c * p + stage), two for Chimera (this stage's part and the mirror stage's part, a replica
    kept in sync by ``allreduce_embedding_gradients``). Weights are layout-independent (same seed, same
    weights), so every replica starts identical."""
    from megallama.model import build_model
    name = normalize_schedule_name(schedule)
    p, s = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    parts = model_parts(config, p, name, num_layers_per_virtual_stage, first_stage_num_layers, last_stage_num_layers)
    v = len(parts) // p
    if p == 1:
        mine = [0]
    else:
        mine = chunk_parts(name, p, s, v)
    K = len(parts)
    chunks = []
    for c, k in enumerate(mine):
        m = build_model(config, device=device, dtype=dtype, seed=seed, layer_ids=parts[k], pre_process=k == 0,
                        post_process=k == K - 1, sequence_parallel=sequence_parallel, init=init)
        m.pipeline_part = k
        m.pipeline_schedule = name if p > 1 else "none"
        chunks.append(m)
    return chunks
