"""The grid's coordinates and the process groups carved from it, apart from ``parallel_state``'s getters.

Every rank must call ``dist.new_group`` for every group, its own or not, in the same order (torch's rule), so the
groups are built by partitioning all ranks' coordinates with one key per group kind."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist


@dataclass
class Grid:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: Optional[int] = None  # virtual pipeline size (interleaved schedule)
    rank: int = 0
    world: int = 1
    timeout: Optional[object] = None  # every group's (a timedelta; None: torch's default)

    def coords(self, rank: int):
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return pp_rank, dp_rank, cp_rank, tp_rank

    def rank_of(self, pp_rank: int, dp_rank: int, cp_rank: int, tp_rank: int) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank


def backend_of(group) -> str:
    return dist.get_backend(group)


def build_groups(g: Grid, backend: Optional[str], timeout, create_gloo_process_groups: bool
                 ) -> Tuple[Dict[str, object], Dict[str, List[int]]]:
    """This rank's group and member list of every kind, by name (tp, pp, dp, cp, dp_cp, mp, tp_cp, ep, edp, embd,
    Megatron-core's tp_dp, tp_dp_cp, etp_ep, etp_ep_pp and the *_gloo twins). Groups are None in a world of one."""
    groups: Dict[str, object] = {}
    members: Dict[str, List[int]] = {}
    all_coords = list(itertools.product(range(g.pp), range(g.dp), range(g.cp), range(g.tp)))

    def new(ranks: List[int], group_backend):
        return dist.new_group(ranks, backend=group_backend, timeout=timeout) if g.world > 1 else None

    def build(name: str, key, group_backend=backend, where=lambda p, d, c, t: True):
        """Partition the ranks (those ``where`` keeps) by ``key(coords)``."""
        buckets: Dict[tuple, List[int]] = {}
        for c in all_coords:
            if where(*c):
                buckets.setdefault(key(*c), []).append(g.rank_of(*c))
        for k in sorted(buckets):
            ranks = sorted(buckets[k])
            grp = new(ranks, group_backend)
            if g.rank in ranks:
                groups[name], members[name] = grp, ranks

    def build_or_alias(name: str, key, *same_as, group_backend=backend):
        """A group with the members of one built already (``same_as``: (name, whether equal)) is that group: no
        extra communicator for a group nothing in megallama itself uses."""
        for other, equal in same_as:
            if equal:
                groups[name], members[name] = groups[other], members[other]
                return
        build(name, key, group_backend)

    keys = {"dp": lambda p, d, c, t: (p, c, t), "dp_cp": lambda p, d, c, t: (p, t),
            "edp": lambda p, d, c, t: (p, (d * g.cp + c) % g.ep, t)}  # the ones with gloo twins too
    build("tp", lambda p, d, c, t: (p, d, c))
    build("pp", lambda p, d, c, t: (d, c, t))
    build("dp", keys["dp"])
    build("cp", lambda p, d, c, t: (p, d, t))
    build("dp_cp", keys["dp_cp"])
    build("mp", lambda p, d, c, t: (d, c))  # tp x pp: the ranks that hold one model replica
    build("tp_cp", lambda p, d, c, t: (p, d))
    build("ep", lambda p, d, c, t: (p, (d * g.cp + c) // g.ep, t))  # ep carved from dp x cp (Megatron)
    build("edp", keys["edp"])
    # Embedding group: first and last pipeline stage share tied embedding / output weights.
    build("embd", lambda p, d, c, t: (d, c, t), where=lambda p, d, c, t: p in (0, g.pp - 1))
    # Megatron's tensor-and-data groups (its fp8 amax / MoE reductions), for code written against megatron.core
    build_or_alias("tp_dp", lambda p, d, c, t: (p, c), ("tp", g.dp == 1), ("dp", g.tp == 1))
    build_or_alias("tp_dp_cp", lambda p, d, c, t: (p,), ("tp_dp", g.cp == 1), ("tp_cp", g.dp == 1),
                   ("dp_cp", g.tp == 1))
    # Megatron-core's expert-tensor groups: experts are sharded over the tp group here (expert tp = tp)
    build_or_alias("etp_ep", lambda p, d, c, t: (p, (d * g.cp + c) // g.ep), ("tp", g.ep == 1), ("ep", g.tp == 1))
    build_or_alias("etp_ep_pp", lambda p, d, c, t: ((d * g.cp + c) // g.ep,), ("etp_ep", g.pp == 1),
                   ("mp", g.ep == 1))
    if create_gloo_process_groups:  # on a gloo world the groups are their own twins
        on_gloo = g.world == 1 or backend_of(groups["dp"]) == "gloo"
        same = {"dp": (), "dp_cp": (("dp", g.cp == 1),), "edp": (("dp_cp", g.ep == 1),)}
        for name, key in keys.items():
            twins = [(name, on_gloo)] + [(other + "_gloo", equal) for other, equal in same[name]]
            build_or_alias(name + "_gloo", key, *twins, group_backend="gloo")
    return groups, members
