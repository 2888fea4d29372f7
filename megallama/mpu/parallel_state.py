"""The process grid: the only module that knows how ranks map onto tp/cp/dp/pp (and ep).

Grid order, outer to inner: pp, dp, cp, tp, so tensor-parallel ranks are adjacent and share a node's NVLink:
``rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``.
Expert parallelism carves the data x context-parallel ranks (Megatron-core's rule: expert tp x ep x expert-dp =
tp x cp x dp): ep consecutive ranks of dp x cp (index ``dp_rank * cp + cp_rank``) form an expert group, and the
expert-data-parallel group strides across them. MoE routes per token, so an expert group may hold pieces of one
sequence (cp) as well as other micro-batches (dp); the expert-dp group is exactly the ranks holding the same experts.
Every getter answers sensibly before ``initialize_model_parallel`` (a world of one), so single-process code needs no
process group at all; the group getters take Megatron-core's ``check_initialized`` for its callers and, instead of
asserting, answer None there. Expert tensor parallelism is the tensor-parallel group (experts are tp-sharded), and
Megatron's "partial" data-parallel groups (one distributed-optimizer instance's ranks) are the whole ones: there is
one instance.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.mpu.grid_validation import (check_megatron_init_kwargs, validate_grid,  # noqa: F401 (re-exported)
                                           validate_model_shapes)
from megallama.mpu.process_grid import Grid as _Grid, build_groups


_GRID: Optional[_Grid] = None
_GROUPS: Dict[str, object] = {}
_RANKS: Dict[str, List[int]] = {}
_VPP_RANK: Optional[int] = None


def _grid() -> _Grid:
    return _GRID if _GRID is not None else _Grid()


def model_parallel_is_initialized() -> bool:
    return _GRID is not None


def check_initialized_for_world(what: str) -> None:
    """Several ranks but no ``initialize_model_parallel``: the getters answer "world of one" (single-process use),
    so ``what`` would reduce over nobody and every rank would silently train its own model."""
    if _GRID is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(f"torch.distributed has {dist.get_world_size()} ranks but parallel_state is not "
                          f"initialized: call megallama.mpu.parallel_state.initialize_model_parallel(...) before "
                          f"{what}")


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                              backend: Optional[str] = None, model_config=None, timeout=None,
                              create_gloo_process_groups: bool = True, **megatron_kwargs) -> None:
    """Build every group of the grid. ``torch.distributed`` must already be initialised (any backend).
    ``timeout`` (a timedelta; --distributed-timeout-minutes) applies to every group, as to the world group: a
    subgroup otherwise gets torch's default and a long collective in tp or dp dies at that instead.
    ``create_gloo_process_groups`` (Megatron-core's, on by default; --disable-gloo-process-groups): the CPU twins
    of the data-parallel groups that Megatron code reaches for host-side collectives; on a gloo world they are the
    groups themselves. Megatron-core's other keywords are taken where megallama has their meaning
    (``distributed_timeout_minutes``, ``hierarchical_context_parallel_sizes``, ``expert_tensor_parallel_size`` =
    tp, one distributed-optimizer instance, its default order); any other value is one ``ConfigError``.

    The layout (and ``model_config``'s heads / kv heads / FFN / vocab against tp, when given) is validated first:
    a bad one raises one ``ConfigError`` before any group is made."""
    global _GRID, _VPP_RANK
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call megallama.initialize.initialize_distributed first")
    world, rank = dist.get_world_size(), dist.get_rank()
    minutes, hierarchical = check_megatron_init_kwargs(tensor_model_parallel_size, context_parallel_size,
                                                       megatron_kwargs)
    if timeout is None and minutes is not None:
        timeout = timedelta(minutes=minutes)
    dp = validate_grid(world, tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
                       expert_model_parallel_size, model_config=model_config)
    g = _Grid(tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size, dp=dp, cp=context_parallel_size,
              ep=expert_model_parallel_size, vpp=virtual_pipeline_model_parallel_size, rank=rank, world=world,
              timeout=timeout)
    destroy_model_parallel()
    _GRID = g
    _VPP_RANK = 0 if virtual_pipeline_model_parallel_size else None
    groups, ranks = build_groups(g, backend, timeout, create_gloo_process_groups)
    _GROUPS.update(groups)
    _RANKS.update(ranks)
    if hierarchical is not None:  # Megatron builds the a2a+p2p sub-groups here; --cp-comm-type picks them
        from megallama.mpu.context_parallel import new_hierarchical_groups
        new_hierarchical_groups(hierarchical[0])


def destroy_model_parallel() -> None:
    """Forget the grid and every group of it, the a2a+p2p sub-groups that ``set_context_parallel_comm_type``
    registers here included (Megatron's: the references go; torch keeps the communicators until
    ``destroy_process_group``). Getters then answer as before ``initialize_model_parallel``."""
    global _GRID, _VPP_RANK
    _GRID, _VPP_RANK = None, None
    _GROUPS.clear()
    _RANKS.clear()


def _group(name: str):
    if _GRID is None:
        return None
    return _GROUPS.get(name)


def _my_coords():
    g = _grid()
    return g.coords(g.rank)


# ---- groups ----
def get_tensor_model_parallel_group(check_initialized: bool = True):
    return _group("tp")


def get_pipeline_model_parallel_group(check_initialized: bool = True):
    return _group("pp")


def _dp_name(with_context_parallel: bool, partial_data_parallel: bool) -> str:
    """Megatron's partial data-parallel group is one distributed-optimizer instance's ranks; there is one instance
    here (--num-distributed-optimizer-instances 1), so it is the whole dp x cp group."""
    if partial_data_parallel and not with_context_parallel:
        raise ConfigError("partial_data_parallel=True needs with_context_parallel=True (Megatron-core's rule: a "
                          "distributed-optimizer instance spans context parallelism)")
    return "dp_cp" if with_context_parallel else "dp"


def get_data_parallel_group(with_context_parallel: bool = False, partial_data_parallel: bool = False):
    return _group(_dp_name(with_context_parallel, partial_data_parallel))


def get_context_parallel_group(check_initialized: bool = True):
    return _group("cp")


def get_model_parallel_group(check_initialized: bool = True):
    return _group("mp")


def get_embedding_group(check_initialized: bool = True):
    return _group("embd")


def get_expert_model_parallel_group(check_initialized: bool = True):
    return _group("ep")


def get_expert_data_parallel_group(check_initialized: bool = True, partial_expert_data_parallel: bool = False):
    return _group("edp")


def get_tensor_and_context_parallel_group(check_initialized: bool = True):
    return _group("tp_cp")


def get_tensor_and_data_parallel_group(check_initialized: bool = True, with_context_parallel: bool = False):
    """The tp x dp ranks of my pipeline stage (and context-parallel rank, unless ``with_context_parallel``)."""
    return _group("tp_dp_cp" if with_context_parallel else "tp_dp")


def get_amax_reduction_group(with_context_parallel: bool = False, tp_only_amax_red: bool = False):
    """Megatron-core's fp8 amax group: tp x dp (x cp), or, with ``tp_only_amax_red``, tp (x cp) alone."""
    if tp_only_amax_red:
        return _group("tp_cp" if with_context_parallel else "tp")
    return get_tensor_and_data_parallel_group(with_context_parallel=with_context_parallel)


def get_expert_tensor_parallel_group(check_initialized: bool = True):
    return _group("tp")


def get_expert_tensor_and_model_parallel_group(check_initialized: bool = True):
    """expert tp x ep (Megatron-core's tp_ep group: the ranks that hold one copy of every expert)."""
    return _group("etp_ep")


def get_expert_tensor_model_pipeline_parallel_group(check_initialized: bool = True):
    return _group("etp_ep_pp")


def get_hierarchical_context_parallel_groups(check_initialized: bool = True):
    """[a2a group, p2p group] of --cp-comm-type a2a+p2p (``megallama.mpu.context_parallel`` builds them)."""
    from megallama.mpu.context_parallel import get_hierarchical_context_parallel_groups as groups
    return groups(check_initialized)


def _gloo(name: str):
    if _GRID is not None and _GRID.world > 1 and name + "_gloo" not in _GROUPS:
        raise ConfigError("the gloo process groups were not created (--disable-gloo-process-groups, or "
                          "initialize_model_parallel(create_gloo_process_groups=False)); leave them on to use them")
    return _group(name + "_gloo")


def get_data_parallel_group_gloo(with_context_parallel: bool = False, partial_data_parallel: bool = False):
    """The data-parallel ranks on gloo, for host-side collectives (Megatron's checkpoint and data code)."""
    return _gloo(_dp_name(with_context_parallel, partial_data_parallel))


def get_expert_data_parallel_group_gloo(partial_expert_data_parallel: bool = False):
    return _gloo("edp")


# ---- ranks in groups ----
def get_pipeline_model_parallel_ranks() -> List[int]:
    return _RANKS.get("pp", [0])


def get_context_parallel_global_ranks(check_initialized: bool = True) -> List[int]:
    return _RANKS.get("cp", [0])


def get_data_parallel_global_ranks(with_context_parallel: bool = False) -> List[int]:
    return _RANKS.get("dp_cp" if with_context_parallel else "dp", [0])


def get_embedding_ranks() -> List[int]:
    return _RANKS.get("embd", [0])


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tp rank 0 in my tp group (broadcast source for data)."""
    return _RANKS.get("tp", [0])[0]


def get_model_parallel_src_rank() -> int:
    return _RANKS.get("mp", [0])[0]


def get_expert_model_parallel_src_rank() -> int:
    return _RANKS.get("ep", [0])[0]


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    """Global rank of dp rank 0 in my dp group (broadcast source for weights)."""
    return get_data_parallel_global_ranks(with_context_parallel)[0]


def get_pipeline_model_parallel_first_rank() -> int:
    """Global rank of the first stage of my pipeline."""
    return get_pipeline_model_parallel_ranks()[0]


def get_pipeline_model_parallel_last_rank() -> int:
    """Global rank of the last stage of my pipeline."""
    return get_pipeline_model_parallel_ranks()[get_pipeline_model_parallel_world_size() - 1]


def is_rank_in_embedding_group(ignore_virtual: bool = False, vp_stage: Optional[int] = None) -> bool:
    """Megatron-core's rule: a rank of the embedding group takes part when it holds the first (or last) virtual
    stage of the model, unless ``ignore_virtual``."""
    rank, ranks = _grid().rank, get_embedding_ranks()
    if ignore_virtual or rank not in ranks:
        return rank in ranks
    if rank == ranks[0]:
        return is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if rank == ranks[-1]:
        return is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return True


# ---- sizes and ranks ----
def get_tensor_model_parallel_world_size() -> int:
    return _grid().tp


def get_tensor_model_parallel_rank() -> int:
    return _my_coords()[3]


def get_pipeline_model_parallel_world_size() -> int:
    return _grid().pp


def get_pipeline_model_parallel_rank() -> int:
    return _my_coords()[0]


def get_data_parallel_world_size(with_context_parallel: bool = False, partial_data_parallel: bool = False) -> int:
    _dp_name(with_context_parallel, partial_data_parallel)
    g = _grid()
    return g.dp * (g.cp if with_context_parallel else 1)


def get_data_parallel_rank(with_context_parallel: bool = False, partial_data_parallel: bool = False) -> int:
    _dp_name(with_context_parallel, partial_data_parallel)
    _, d, c, _ = _my_coords()
    return d * _grid().cp + c if with_context_parallel else d


def get_context_parallel_world_size() -> int:
    return _grid().cp


def get_context_parallel_rank() -> int:
    return _my_coords()[2]


def get_tensor_and_context_parallel_world_size() -> int:
    return _grid().tp * _grid().cp


def get_tensor_and_context_parallel_rank() -> int:
    _, _, c, t = _my_coords()
    return c * _grid().tp + t


def get_expert_tensor_parallel_world_size() -> int:
    return _grid().tp


def get_expert_tensor_parallel_rank() -> int:
    return _my_coords()[3]


def get_expert_tensor_and_model_parallel_world_size() -> int:
    return _grid().tp * _grid().ep


def get_expert_tensor_and_model_parallel_rank() -> int:
    return get_expert_model_parallel_rank() * _grid().tp + _my_coords()[3]


def get_expert_model_parallel_world_size() -> int:
    return _grid().ep


def get_expert_model_parallel_rank() -> int:
    return get_data_parallel_rank(with_context_parallel=True) % _grid().ep


def get_expert_data_parallel_world_size(partial_expert_data_parallel: bool = False) -> int:
    """The ranks holding the same experts: dp x cp / ep (their expert gradients are reduced together)."""
    g = _grid()
    return g.dp * g.cp // g.ep


def get_expert_data_parallel_rank(partial_expert_data_parallel: bool = False) -> int:
    return get_data_parallel_rank(with_context_parallel=True) // _grid().ep


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _grid().vpp


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VPP_RANK


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    global _VPP_RANK
    _VPP_RANK = rank


def is_pipeline_first_stage(ignore_virtual: bool = False, vp_stage: Optional[int] = None) -> bool:
    """``vp_stage`` (Megatron-core's newer form) names the virtual stage asked about instead of the one set by
    ``set_virtual_pipeline_model_parallel_rank``."""
    vp = _VPP_RANK if vp_stage is None else vp_stage
    if not ignore_virtual and _grid().vpp and vp not in (None, 0):
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False, vp_stage: Optional[int] = None) -> bool:
    g = _grid()
    vp = _VPP_RANK if vp_stage is None else vp_stage
    if not ignore_virtual and g.vpp and vp not in (None, g.vpp - 1):
        return False
    return get_pipeline_model_parallel_rank() == g.pp - 1


def get_pipeline_model_parallel_next_rank() -> int:
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def get_grid_summary() -> str:
    g = _grid()
    return f"world={g.world} tp={g.tp} pp={g.pp} dp={g.dp} cp={g.cp} ep={g.ep} vpp={g.vpp}"


def default_device() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
