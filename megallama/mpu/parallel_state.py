"""The process grid: the only module that knows how ranks map onto tp/cp/dp/pp (and ep).

Grid order, outer to inner: pp, dp, cp, tp, so tensor-parallel ranks are adjacent and share a node's NVLink:
``rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``.
Expert parallelism carves the data x context-parallel ranks (Megatron-core's rule: expert tp x ep x expert-dp =
tp x cp x dp): ep consecutive ranks of dp x cp (index ``dp_rank * cp + cp_rank``) form an expert group, and the
expert-data-parallel group strides across them. MoE routes per token, so an expert group may hold pieces of one
sequence (cp) as well as other micro-batches (dp); the expert-dp group is exactly the ranks holding the same experts.
Every getter answers sensibly before ``initialize_model_parallel`` (a world of one), so single-process code needs no
process group at all.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megallama.errors import ConfigError


@dataclass
class _Grid:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: Optional[int] = None  # virtual pipeline size (interleaved schedule)
    rank: int = 0
    world: int = 1

    def coords(self, rank: int):
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return pp_rank, dp_rank, cp_rank, tp_rank

    def rank_of(self, pp_rank: int, dp_rank: int, cp_rank: int, tp_rank: int) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank


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


def validate_model_shapes(tensor_model_parallel_size: int, model_config) -> None:
    """tp must divide the attention heads, the kv heads (query groups), the FFN size and the vocabulary.

    ``model_config`` is any object with those attributes (``megallama.config.ModelConfig``); missing ones are
    skipped."""
    tp = tensor_model_parallel_size
    checks = (("num_attention_heads", "attention heads", "--num-attention-heads"),
              ("num_query_groups", "kv heads (query groups)", "--num-query-groups"),
              ("ffn_hidden_size", "FFN hidden size", "--ffn-hidden-size"),
              ("vocab_size", "vocabulary size", "--vocab-size"))
    for attr, what, flag in checks:
        v = getattr(model_config, attr, None)
        if v and v % tp:
            raise ConfigError(f"tensor-parallel size {tp} does not divide the {what} {v}; choose "
                              f"--tensor-model-parallel-size dividing {v} (or change {flag})")


def validate_grid(world_size: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                  context_parallel_size: int = 1, expert_model_parallel_size: int = 1, model_config=None) -> int:
    """Check the layout against the world size (and the model's shapes, when given); return the data-parallel
    size. Pure arithmetic: call it before any process group exists."""
    tp, pp, cp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
                      expert_model_parallel_size)
    for name, v in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
        if v < 1:
            raise ConfigError(f"--{name}-model-parallel-size must be >= 1, got {v}")
    mp = tp * pp * cp
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {mp}; launch a multiple of "
            f"{mp} processes or change the parallel sizes")
    dp = world_size // mp
    if model_config is not None:
        validate_model_shapes(tp, model_config)
    if (dp * cp) % ep:
        raise ConfigError(f"expert parallel size {ep} must divide data-parallel x context-parallel size {dp * cp} "
                          f"(dp {dp} = world {world_size} / tp*pp*cp {mp}, cp {cp}); choose an ep dividing {dp * cp}")
    return dp


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                              backend: Optional[str] = None, model_config=None, timeout=None) -> None:
    """Build every group of the grid. ``torch.distributed`` must already be initialised (any backend).
    ``timeout`` (a timedelta; --distributed-timeout-minutes) applies to every group, as to the world group: a
    subgroup otherwise gets torch's default and a long collective in tp or dp dies at that instead.

    The layout (and ``model_config``'s heads / kv heads / FFN / vocab against tp, when given) is validated first:
    a bad one raises one ``ConfigError`` before any group is made."""
    global _GRID, _VPP_RANK
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call megallama.initialize.initialize_distributed first")
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = validate_grid(world, tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
                       expert_model_parallel_size, model_config=model_config)
    g = _Grid(tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size, dp=dp, cp=context_parallel_size,
              ep=expert_model_parallel_size, vpp=virtual_pipeline_model_parallel_size, rank=rank, world=world)
    destroy_model_parallel()
    _GRID = g
    _VPP_RANK = 0 if virtual_pipeline_model_parallel_size else None
    R = range
    all_coords = list(itertools.product(R(g.pp), R(g.dp), R(g.cp), R(g.tp)))

    def build(name: str, key):
        """Partition all ranks by ``key(coords)``; every rank creates every group in the same order."""
        buckets: Dict[tuple, List[int]] = {}
        for c in all_coords:
            buckets.setdefault(key(*c), []).append(g.rank_of(*c))
        for k in sorted(buckets):
            ranks = sorted(buckets[k])
            grp = dist.new_group(ranks, backend=backend, timeout=timeout) if world > 1 else None
            if rank in ranks:
                _GROUPS[name], _RANKS[name] = grp, ranks

    build("tp", lambda p, d, c, t: (p, d, c))
    build("pp", lambda p, d, c, t: (d, c, t))
    build("dp", lambda p, d, c, t: (p, c, t))
    build("cp", lambda p, d, c, t: (p, d, t))
    build("dp_cp", lambda p, d, c, t: (p, t))
    build("mp", lambda p, d, c, t: (d, c))  # tp x pp: the ranks that hold one model replica
    build("tp_cp", lambda p, d, c, t: (p, d))
    build("ep", lambda p, d, c, t: (p, (d * g.cp + c) // g.ep, t))  # ep carved from dp x cp (Megatron)
    build("edp", lambda p, d, c, t: (p, (d * g.cp + c) % g.ep, t))
    # Embedding group: first and last pipeline stage share tied embedding / output weights.
    buckets = {}
    for c in all_coords:
        if c[0] in (0, g.pp - 1):
            buckets.setdefault(c[1:], []).append(g.rank_of(*c))
    for k in sorted(buckets):
        ranks = sorted(set(buckets[k]))
        grp = dist.new_group(ranks, backend=backend, timeout=timeout) if world > 1 else None
        if rank in ranks:
            _GROUPS["embd"], _RANKS["embd"] = grp, ranks

    def build_or_alias(name: str, key, *same_as):
        """A group with the members of one built already (``same_as``: (name, whether equal)) is that group: no
        extra communicator for a group nothing in megallama itself uses."""
        for other, equal in same_as:
            if equal:
                _GROUPS[name], _RANKS[name] = _GROUPS[other], _RANKS[other]
                return
        build(name, key)

    # Megatron's tensor-and-data groups (its fp8 amax / MoE reductions), for code written against megatron.core
    build_or_alias("tp_dp", lambda p, d, c, t: (p, c), ("tp", g.dp == 1), ("dp", g.tp == 1))
    build_or_alias("tp_dp_cp", lambda p, d, c, t: (p,), ("tp_dp", g.cp == 1), ("tp_cp", g.dp == 1),
                   ("dp_cp", g.tp == 1))


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
def get_tensor_model_parallel_group():
    return _group("tp")


def get_pipeline_model_parallel_group():
    return _group("pp")


def get_data_parallel_group(with_context_parallel: bool = False):
    return _group("dp_cp" if with_context_parallel else "dp")


def get_context_parallel_group():
    return _group("cp")


def get_model_parallel_group():
    return _group("mp")


def get_embedding_group():
    return _group("embd")


def get_expert_model_parallel_group():
    return _group("ep")


def get_expert_data_parallel_group():
    return _group("edp")


def get_tensor_and_context_parallel_group():
    return _group("tp_cp")


def get_tensor_and_data_parallel_group(with_context_parallel: bool = False):
    """The tp x dp ranks of my pipeline stage (and context-parallel rank, unless ``with_context_parallel``)."""
    return _group("tp_dp_cp" if with_context_parallel else "tp_dp")


# ---- ranks in groups ----
def get_pipeline_model_parallel_ranks() -> List[int]:
    return _RANKS.get("pp", [0])


def get_context_parallel_global_ranks() -> List[int]:
    return _RANKS.get("cp", [0])


def get_data_parallel_global_ranks(with_context_parallel: bool = False) -> List[int]:
    return _RANKS.get("dp_cp" if with_context_parallel else "dp", [0])


def get_embedding_ranks() -> List[int]:
    return _RANKS.get("embd", [0])


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tp rank 0 in my tp group (broadcast source for data)."""
    return _RANKS.get("tp", [0])[0]


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    """Global rank of dp rank 0 in my dp group (broadcast source for weights)."""
    return get_data_parallel_global_ranks(with_context_parallel)[0]


def get_pipeline_model_parallel_first_rank() -> int:
    """Global rank of the first stage of my pipeline."""
    return get_pipeline_model_parallel_ranks()[0]


def get_pipeline_model_parallel_last_rank() -> int:
    """Global rank of the last stage of my pipeline."""
    return get_pipeline_model_parallel_ranks()[get_pipeline_model_parallel_world_size() - 1]


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    """Megatron-core's rule: a rank of the embedding group takes part when it holds the first (or last) virtual
    stage of the model, unless ``ignore_virtual``."""
    rank, ranks = _grid().rank, get_embedding_ranks()
    if ignore_virtual or rank not in ranks:
        return rank in ranks
    if rank == ranks[0]:
        return is_pipeline_first_stage(ignore_virtual=False)
    if rank == ranks[-1]:
        return is_pipeline_last_stage(ignore_virtual=False)
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


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    g = _grid()
    return g.dp * (g.cp if with_context_parallel else 1)


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    _, d, c, _ = _my_coords()
    return d * _grid().cp + c if with_context_parallel else d


def get_context_parallel_world_size() -> int:
    return _grid().cp


def get_context_parallel_rank() -> int:
    return _my_coords()[2]


def get_expert_model_parallel_world_size() -> int:
    return _grid().ep


def get_expert_model_parallel_rank() -> int:
    return get_data_parallel_rank(with_context_parallel=True) % _grid().ep


def get_expert_data_parallel_world_size() -> int:
    """The ranks holding the same experts: dp x cp / ep (their expert gradients are reduced together)."""
    g = _grid()
    return g.dp * g.cp // g.ep


def get_expert_data_parallel_rank() -> int:
    return get_data_parallel_rank(with_context_parallel=True) // _grid().ep


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _grid().vpp


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VPP_RANK


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    global _VPP_RANK
    _VPP_RANK = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    if not ignore_virtual and _grid().vpp and _VPP_RANK not in (None, 0):
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    g = _grid()
    if not ignore_virtual and g.vpp and _VPP_RANK not in (None, g.vpp - 1):
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
