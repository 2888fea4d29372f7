"""Context parallelism, the communication half: zig-zag sequence sharding, the K/V ring, the Ulysses all-to-all,
the K/V all-gather (and its reduce-scatter), the hierarchical (a2a inside, p2p across) sub-groups.

The sequence of every sample is cut into ``2*cp`` equal chunks and cp rank ``r`` holds chunks ``r`` and
``2*cp-1-r`` (zig-zag): under a causal mask every rank then has the same amount of attention work (an early chunk
sees little, its late partner sees much). All tensors of a batch are sliced the same way, so (input, label) pairs
stay aligned and RoPE takes the chunks' *global* positions (``position_ids``).

Loss: the DDP averages gradients over dp x cp, so a cp rank's loss is its masked loss *sum* times cp over the
token count of the whole sequence (all cp ranks): :func:`cp_mean_loss`.
"""
from __future__ import annotations

import itertools
from typing import Dict

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu.mappings import _ALL_GATHER, _REDUCE_SCATTER, all_to_all


def _cp_group(group=None):
    return group if group is not None else ps.get_context_parallel_group()


# ---------------------------------------------------------------- zig-zag sharding (pure)
def check_sequence_length(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size):
        raise ConfigError(f"sequence length {seq_len} is not divisible by 2 x context-parallel size = {2 * cp_size} "
                          f"(zig-zag chunks); pick --seq-length divisible by {2 * cp_size}")


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank``: chunk ``r`` then chunk ``2*cp-1-r`` (each ``seq_len / (2*cp)`` long)."""
    check_sequence_length(seq_len, cp_size)
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat((first, second))


def zigzag_to_natural(seq_len: int, cp_size: int, device=None) -> torch.Tensor:
    """``perm`` with ``rank_major[:, perm] == natural``, where ``rank_major`` concatenates the ranks' local
    sequences in rank order (what an all-gather / all-to-all over cp gives)."""
    order = torch.cat([zigzag_indices(seq_len, cp_size, r, device) for r in range(cp_size)])
    return torch.argsort(order)


def get_position_ids_on_this_cp_rank(seq_len: int, device=None) -> torch.Tensor:
    """RoPE positions [seq_len / cp] of this rank's tokens of a ``seq_len``-token sequence."""
    return zigzag_indices(seq_len, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), device)


def get_batch_on_this_cp_rank(batch: Dict[str, object]) -> Dict[str, object]:
    """This cp rank's zig-zag share of a batch: every tensor shaped [b, seq, ...] (input_ids, labels, loss_mask,
    position_ids, document_ids ...) is sliced along dim 1; other entries pass through. ``position_ids`` [b, s/cp]
    are added when the batch has none. The identity when cp = 1."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    ids = batch["input_ids"]
    b, seq = ids.shape[0], ids.shape[1]
    idx = zigzag_indices(seq, cp, ps.get_context_parallel_rank(), device=ids.device)
    out = {}
    for key, val in batch.items():
        if torch.is_tensor(val) and val.dim() >= 2 and val.shape[1] == seq:
            out[key] = val.index_select(1, idx.to(val.device))
        else:
            out[key] = val
    if "position_ids" not in out:
        out["position_ids"] = idx.unsqueeze(0).expand(b, -1).contiguous()
    return out


# ---------------------------------------------------------------- loss normalisation
def cp_mean_loss(loss_sum: torch.Tensor, loss_mask: torch.Tensor, with_count: bool = False):
    """Masked-mean loss of the whole sequence as this cp rank's share, for gradients averaged over dp x cp:
    ``loss_sum * cp / (mask tokens over the cp group)``. Summed over cp ranks / cp it is the true mean; the
    value is that mean's cp-rank share times cp (average it over dp x cp to log it). cp = 1: loss_sum / tokens.
    ``with_count``: also that token count (the weight of this mean in a token-weighted one)."""
    count = loss_mask.detach().sum().to(torch.float32).reshape(1)
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        dist.all_reduce(count, group=ps.get_context_parallel_group())
    loss = loss_sum * cp / count.clamp_min(1.0).to(loss_sum.dtype)[0]
    return (loss, count[0]) if with_count else loss


# ---------------------------------------------------------------- the ring (p2p)
class _Exchange:
    def __init__(self, works, recv: torch.Tensor):
        self.works, self.recv = works, recv

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.recv


class RingExchange:
    """Send to the next cp rank, receive from the previous one, asynchronously (batched isend/irecv: no NCCL
    deadlock, works on gloo). ``tag`` keeps two streams in flight apart (K/V and dK/dV in backward)."""

    def __init__(self, group=None):
        self.group = _cp_group(group)
        ranks = dist.get_process_group_ranks(self.group)
        me = ranks.index(dist.get_rank())
        self.next, self.prev = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]

    def start(self, send: torch.Tensor, tag: int = 0) -> _Exchange:
        send = send.contiguous()
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return _Exchange(dist.batch_isend_irecv(ops), recv)


def all_gather_cp(x: torch.Tensor, group=None) -> torch.Tensor:
    """[cp, *x.shape]: every cp rank's ``x`` (no autograd; for index tensors such as document ids)."""
    cp = ps.get_context_parallel_world_size() if group is None else dist.get_world_size(group)
    group = _cp_group(group)
    if cp == 1:
        return x.unsqueeze(0)
    out = torch.empty((cp,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


# ---------------------------------------------------------------- the K/V all-gather (Llama 3's variant)
def _rank_major_order(seq_len: int, cp: int, device) -> torch.Tensor:
    """Natural positions of the ranks' local sequences concatenated in rank order."""
    return torch.cat([zigzag_indices(seq_len, cp, r, device) for r in range(cp)])


def gather_zigzag(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """The cp ranks' zig-zag shares of ``x`` (split along ``dim``) all-gathered into natural sequence order.
    No autograd: the all-gather attention calls it in forward and again in backward, so the gathered K/V live
    during one layer's attention only."""
    group = _cp_group(group)
    n, dim = dist.get_world_size(group), dim % x.dim()
    x = x.contiguous()
    buf = torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    _ALL_GATHER(buf.flatten(0, 1), x, group=group)
    rank_major = buf.movedim(0, dim).flatten(dim, dim + 1)
    return rank_major.index_select(dim, zigzag_to_natural(rank_major.shape[dim], n, device=x.device))


def reduce_scatter_zigzag(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Adjoint of :func:`gather_zigzag`: ``x`` (natural order, full sequence) summed over the cp ranks, each
    keeping its zig-zag share (dK/dV of the all-gather attention)."""
    group = _cp_group(group)
    n, dim = dist.get_world_size(group), dim % x.dim()
    rank_major = x.index_select(dim, _rank_major_order(x.shape[dim], n, x.device))
    chunks = rank_major.unflatten(dim, (n, x.shape[dim] // n)).movedim(dim, 0).contiguous()
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)
    _REDUCE_SCATTER(out, chunks.flatten(0, 1), group=group)
    return out


# ---------------------------------------------------------------- hierarchical cp: a2a inside, p2p across
_HCP_A2A, _HCP_P2P = "hcp_a2a", "hcp_p2p"  # their names among parallel_state's groups


def new_hierarchical_groups(inner: int):
    """(a2a group, p2p group) of this rank for ``--hierarchical-context-parallel-sizes inner outer``, Megatron's
    layout: ``inner`` adjacent cp ranks form an a2a group, the cp ranks with the same index inside theirs form a
    p2p group. Every rank creates every group (``new_group`` is collective), in the same order. They are
    registered with the grid's groups, so ``destroy_model_parallel`` drops them with the rest (a rebuilt grid
    never runs on a previous grid's sub-groups); asked again for the same ``inner`` (``initialize_model_parallel``'s
    sizes, then --cp-comm-type a2a+p2p), the ones built are kept. They take the grid's timeout, as its groups do."""
    grid, me = ps._grid(), dist.get_rank()
    if len(ps._RANKS.get(_HCP_A2A, ())) == inner and ps._group(_HCP_P2P) is not None:
        return ps._group(_HCP_A2A), ps._group(_HCP_P2P)
    a2a = p2p = None
    for pp, dp, tp in itertools.product(range(grid.pp), range(grid.dp), range(grid.tp)):
        cp_ranks = [grid.rank_of(pp, dp, c, tp) for c in range(grid.cp)]
        for ranks in (cp_ranks[i:i + inner] for i in range(0, grid.cp, inner)):
            group = dist.new_group(ranks, timeout=grid.timeout)
            a2a = group if me in ranks else a2a
        for ranks in (cp_ranks[i::inner] for i in range(inner)):
            group = dist.new_group(ranks, timeout=grid.timeout)
            p2p = group if me in ranks else p2p
    ps._GROUPS[_HCP_A2A], ps._GROUPS[_HCP_P2P] = a2a, p2p
    ps._RANKS[_HCP_A2A], ps._RANKS[_HCP_P2P] = dist.get_process_group_ranks(a2a), dist.get_process_group_ranks(p2p)
    return a2a, p2p


def get_hierarchical_context_parallel_groups(check_initialized: bool = True):
    """[a2a group, p2p group] of a2a+p2p (Megatron's getter): built by ``set_context_parallel_comm_type('a2a+p2p',
    sizes)`` after ``initialize_model_parallel``, dropped by ``destroy_model_parallel``. Missing: RuntimeError, or
    None with ``check_initialized=False``."""
    a2a, p2p = ps._group(_HCP_A2A), ps._group(_HCP_P2P)
    if a2a is None or p2p is None:
        if check_initialized:
            raise RuntimeError("hierarchical context-parallel groups are not initialized (destroy_model_parallel "
                               "drops them); call set_context_parallel_comm_type('a2a+p2p', [a2a, p2p]) after "
                               "initialize_model_parallel")
        return None
    return [a2a, p2p]


# ---------------------------------------------------------------- Ulysses all-to-all
def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """[b, s/cp, h, d] (this rank's tokens, all heads) -> [b, s, h/cp, d] (all ranks' tokens in rank order,
    this rank's block of heads). Differentiable; the backward is :func:`heads_to_seq`."""
    cp = dist.get_world_size(_cp_group(group))
    b, s, h, d = x.shape
    if h % cp:
        raise ConfigError(f"all-to-all context parallelism needs the {h} heads per rank to be divisible "
                          f"by the context-parallel size {cp}; use the ring (p2p) variant")
    y = all_to_all(x.reshape(b, s, cp, h // cp, d).permute(2, 0, 1, 3, 4), _cp_group(group))  # [src, b, s, h/cp, d]
    return y.permute(1, 0, 2, 3, 4).reshape(b, cp * s, h // cp, d)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: [b, s, h/cp, d] -> [b, s/cp, h, d]."""
    cp = dist.get_world_size(_cp_group(group))
    b, S, h, d = x.shape
    y = all_to_all(x.reshape(b, cp, S // cp, h, d).permute(1, 0, 2, 3, 4), _cp_group(group))  # [src heads, b, s, h, d]
    return y.permute(1, 2, 0, 3, 4).reshape(b, S // cp, cp * h, d)
