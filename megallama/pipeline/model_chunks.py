"""Build this rank's model chunks for a pipeline schedule: which layers, embedding and head each chunk holds."""
from __future__ import annotations

from typing import List, Optional

import torch

from megallama.config import ModelConfig
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.pipeline.partition import (costs_from_config, megatron_split, partition_layers, parts_of,
                                          virtual_chunks)
from megallama.pipeline.schedules import chunk_parts, normalize_schedule_name


def unwrap_model(model):
    """The LlamaForCausalLM inside DDP/ZeRO wrappers (they keep it as ``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "set_input_tensor"):
        model = model.module
    return model


def model_parts(config: ModelConfig, num_stages: int, schedule: str, num_layers_per_virtual_stage=None,
                first_stage_num_layers=None, last_stage_num_layers=None, seq_length=None, *, layer_counts=None,
                num_virtual_stages=None) -> List[List[int]]:
    """Layer ids of every model part for ``schedule``. ``layer_counts``: decoder layers per part as the flags
    resolved them (a layout string, Megatron's uneven virtual stages), taken as given. Otherwise interleaved cuts
    ``num_virtual_stages`` (or L / (p x ``num_layers_per_virtual_stage``)) chunks per rank, equal unless the
    first/last rank is pinned (Megatron's rule, ``megatron_split``); one chunk per rank is balanced by cost."""
    name = normalize_schedule_name(schedule)
    L = config.num_layers
    if layer_counts is not None:
        return parts_of(layer_counts, L, num_stages)
    if name == "interleaved" and num_stages > 1:
        pinned = first_stage_num_layers is not None or last_stage_num_layers is not None
        if pinned and num_virtual_stages is None:  # Megatron's rule: the chunk size is no longer one number
            raise ConfigError("--decoder-first/last-pipeline-num-layers with the interleaved schedule take "
                              "--num-virtual-stages-per-pipeline-rank (as in Megatron), not "
                              "--num-layers-per-virtual-pipeline-stage; pass that instead")
        v = num_virtual_stages or virtual_chunks(L, num_stages, num_layers_per_virtual_stage)
        if not pinned and L % (num_stages * v):
            raise ConfigError(f"--num-virtual-stages-per-pipeline-rank {v} does not split {L} layers into "
                              f"{num_stages} stages x {v} chunks; pick a value that divides the layers per stage")
        return parts_of(megatron_split(L, num_stages, v, first=first_stage_num_layers,
                                       last=last_stage_num_layers), L, num_stages)
    return partition_layers(L, num_stages, 1, costs=costs_from_config(config, seq_length),
                            first_stage_num_layers=first_stage_num_layers, last_stage_num_layers=last_stage_num_layers)


def build_model_chunks(config: ModelConfig, *, device="cpu", dtype=torch.float32, seed: int = 1234,
                       sequence_parallel: bool = False, schedule: str = "1f1b",
                       num_layers_per_virtual_stage: Optional[int] = None, first_stage_num_layers: Optional[int] = None,
                       last_stage_num_layers: Optional[int] = None, init: bool = True, layer_counts=None,
                       num_virtual_stages: Optional[int] = None) -> list:
    """This rank's chunks, in the order the schedule names them: one for GPipe/1F1B/ZB-H1, ``v`` for interleaved
    (chunk c = part c * p + stage), two for Chimera (this stage's part and the mirror stage's part, a replica
    kept in sync by ``allreduce_embedding_gradients``). Weights are layout-independent (same seed, same
    weights), so every replica starts identical. ``layer_counts`` / ``num_virtual_stages``: see ``model_parts``;
    a chunk may hold no decoder layer (the embedding or the loss alone), or nothing at all: an empty stage, whose
    forward returns its input (autograd then hands the output grad straight back as the input grad)."""
    from megallama.model import build_model
    name = normalize_schedule_name(schedule)
    p, s = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    parts = model_parts(config, p, name, num_layers_per_virtual_stage, first_stage_num_layers, last_stage_num_layers,
                        layer_counts=layer_counts, num_virtual_stages=num_virtual_stages)
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
        m.params_dtype = dtype  # what an empty stage (no parameters) receives and sends its hidden state in
        m.pipeline_schedule = name if p > 1 else "none"
        chunks.append(m)
    return chunks
