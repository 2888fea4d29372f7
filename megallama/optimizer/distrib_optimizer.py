"""The (ZeRO-sharded) mixed-precision AdamW or SGD over ``DistributedDataParallel`` chunks.

Each rank optimizes its *pieces* (``DDP.optimizer_pieces``): whole parameters at stage 0, the parts of parameters
in its dp shard at stages 1-3. Master weights are fp32: for fp32 models they *are* the model storage (the param
buffer at stages 1-2, the param shard at stage 3, the params at stage 0), for bf16/fp16 models they are a separate
fp32 flat buffer copied back after each step. The update is ``torch.optim.AdamW`` or, with ``--optimizer sgd``,
``torch.optim.SGD`` with momentum (torch_optimizer.py; fused on CUDA, foreach otherwise) over the piece tensors, in
two groups: weight decay for >= 2-D parameters, none for norms and biases;
with ``decoupled_lr`` (Megatron's --decoupled-lr) two more, the same split of the pieces whose parameter is marked
``is_embedding_or_output_parameter`` (``is_decoupled_lr``: the scheduler gives them their own LR). Each rank's
groups hold its own pieces, so they are right at any ZeRO stage (a piece cut by a shard boundary stays in its
parameter's group) and on any pipeline stage (a stage without embedding or output layer has empty decoupled
groups, so every rank has the same groups).

Step: unscale (fp16) -> global norm over shards and model-parallel ranks -> skip if not finite (the dynamic loss
scale backs off) -> clip -> AdamW / SGD -> copy masters to the model -> all-gather params (stages 1-2).

Memory per rank with Ψ parameters and N dp ranks, p bytes/param, g = 4 (fp32 grads; 2 for a bf16 model with
--grad-reduce-in-bf16), K bytes of optimizer state per param: fp32 model p = 4, K = 8 (Adam m and v; the master
is the model copy itself); bf16/fp16 model p = 2, K = 12 (fp32 master + m + v); SGD keeps one state (the
momentum) instead of two: K = 4 and 8 (0 and 4 at momentum 0). Stage 0 (p+g+K)Ψ, 1 (p+g)Ψ + KΨ/N,
2 pΨ + (g+K)Ψ/N, 3 (p+g+K)Ψ/N, plus bucket padding (< dp*64 elements a bucket) and transient buffers: stage 2/3
staging (up to 3 buckets), stage 3 two gathered units.

Checkpoints: ``state_dict()`` is this rank's shard *in parameter space* (name, element range, master and the
optimizer's ``state_keys``: exp_avg, exp_avg_sq or momentum_buffer), so ``load_state_dict`` accepts the state dicts
of all dp ranks of a run with any dp size and stage (pass them as a list) and picks the ranges it owns;
``gather_full_state_dict()`` assembles the whole state on every dp rank (collective), which loads into any layout
as well.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence, Union

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.initialize import warn_rank_0
from megallama.mpu import parallel_state as ps
from megallama.optimizer import clip_grads
from megallama.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megallama.optimizer.distributed import finish_param_sync
from megallama.optimizer.optimizer_config import OptimizerConfig
from megallama.optimizer.torch_optimizer import build_torch_optimizer, describe, set_state, state_keys

FORMAT = "megallama.zero.v1"


def _is_chimera(chunk) -> bool:
    while not hasattr(chunk, "pipeline_schedule") and isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return getattr(chunk, "pipeline_schedule", None) == "chimera"


class DistributedOptimizer:
    def __init__(self, config: OptimizerConfig, model_chunks: Sequence):
        self.config = config.validate()
        self.chunks = list(model_chunks)
        if not self.chunks:
            raise ConfigError("get_megatron_optimizer got no model chunks; wrap the model in DistributedDataParallel")
        for m in self.chunks:
            if not hasattr(m, "optimizer_pieces"):
                raise ConfigError(f"model chunk {type(m).__name__} is not a megallama DistributedDataParallel; wrap "
                                  "it first (DistributedDataParallel(model, zero_stage=...))")
        self.dp_group = self.chunks[0].dp_group
        self.dp_rank, self.dp_size = self.chunks[0].dp_rank, self.chunks[0].dp_size
        self.device = self.chunks[0].device
        self.pieces = []
        self._masters_buffers = []
        for ci, ddp in enumerate(self.chunks):
            pieces = [copy.copy(pc) for pc in ddp.optimizer_pieces()]  # ours to annotate
            separate = ddp.param_dtype != torch.float32
            if separate:
                buf = torch.empty(sum(pc.numel for pc in pieces), dtype=torch.float32, device=self.device)
                self._masters_buffers.append(buf)
            off = 0
            for pc in pieces:
                pc.chunk, pc.key = ci, f"{ci}/{pc.name}"
                # stage 0: the full grad sits on every rank of the piece's group: count it on group rank 0 only
                pc.replicated = ddp.zero_stage == 0 and pc.comm.rank != 0
                if separate:
                    pc.master = buf[off:off + pc.numel]
                    pc.master.copy_(pc.model_view.float())
                    off += pc.numel
                else:
                    pc.master = pc.model_view
                # Chimera's replica chunk holds another stage's part: that stage counts it
                pc.in_norm = clip_grads.counts_in_norm(pc.param) and not (ci > 0 and _is_chimera(ddp))
            self.pieces += pieces
        self._separate_masters = bool(self._masters_buffers)
        fused = config.use_fused
        if fused is None:
            fused = self.device.type == "cuda"
        self.optimizer = build_torch_optimizer(_param_groups(self.pieces, config), config, fused)
        self.state_keys = state_keys(config)  # the per-element states saved and loaded besides the master
        self._fused = fused
        self.grad_scaler = None
        if config.fp16:
            self.grad_scaler = ConstantGradScaler(config.loss_scale) if config.loss_scale else DynamicGradScaler(
                config.initial_loss_scale, config.min_loss_scale, growth_interval=config.loss_scale_window,
                hysteresis=config.hysteresis)
        self.num_steps = 0
        self.skipped_for_loss_scale = False  # the last step: skipped for an fp16 overflow above --min-loss-scale

    # ------------------------------------------------------------------ the Megatron optimizer interface
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def get_loss_scale(self) -> torch.Tensor:
        return self.grad_scaler.scale if self.grad_scaler is not None else torch.tensor(1.0)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.grad_scaler.scale.to(loss.device) if self.grad_scaler is not None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for pc in self.pieces:
            pc.master.grad = None
        for m in self.chunks:
            m.zero_grad_buffer()

    def _prepare_grads(self) -> List[torch.Tensor]:
        grads = []
        for pc in self.pieces:
            if pc.chunk > 0 and _is_chimera(self.chunks[pc.chunk]):  # the runner marks user chunks after __init__;
                pc.in_norm = False  # a Chimera replica is counted by its own stage
            g = pc.grad_view if pc.grad_view.dtype == torch.float32 else pc.grad_view.float()
            pc.master.grad = g
            grads.append(g)
        return grads

    @torch.no_grad()
    def step(self):
        """Returns (update_successful, grad_norm, num_zeros_in_grad); call after every chunk's finish_grad_sync."""
        grads = self._prepare_grads()
        local_inf = self._unscale_and_check(grads)
        counted = [pc.master.grad for pc in self._norm_pieces()]
        local_sq = clip_grads.sum_of_squares(counted, self.device)
        if local_inf is not None:  # a non-finite grad the norm skips: the norm's one all-reduce takes it everywhere
            local_sq.masked_fill_(local_inf > 0, math.inf)
        norm = clip_grads.global_norm(local_sq, self.dp_group)
        found_inf = not math.isfinite(norm)
        scaler = self.grad_scaler
        # an overflow the dynamic scale can still back off from is its search (Megatron skips on, whatever the count)
        self.skipped_for_loss_scale = found_inf and isinstance(scaler, DynamicGradScaler) \
            and float(scaler.scale) > scaler.min_scale
        if scaler is not None:
            scaler.update(found_inf)
        num_zeros = self._count_zeros(counted) if self.config.log_num_zeros_in_grad else None
        if found_inf:
            for pc in self.pieces:
                pc.master.grad = None
            return False, norm, num_zeros
        coef = clip_grads.clip_coefficient(norm, self.config.clip_grad)
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        self.optimizer.step()
        self.num_steps += 1
        for pc in self.pieces:
            pc.master.grad = None
        self._copy_masters_to_model()
        return True, norm, num_zeros

    def _unscale_and_check(self, grads: List[torch.Tensor]):
        """Unscale (fp16) and find non-finite grads in pieces the norm skips on this rank (a norm weight on tp rank
        > 0, the tied output copy, a dp-replicated grad): an inf there must skip the step on every rank, as
        Megatron's found_inf does, or this rank alone would step into NaN. fp16 checks every grad (fused with the
        unscale, Megatron's ``_amp_foreach_non_finite_check_and_unscale_``); bf16/fp32 only the uncounted,
        non-replicated ones (the norm covers the rest; replicated grads are the dp all-reduce's, equal everywhere).
        Returns a 1-element flag tensor (no host sync; the norm's is the step's one), or None when nothing was
        checked."""
        if self.grad_scaler is not None:
            checked, inv = grads, self.grad_scaler.inv_scale
        else:
            checked, inv = [pc.master.grad for pc in self.pieces if not pc.in_norm and not pc.replicated], None
        if not checked:
            return None
        found = torch.zeros(1, dtype=torch.float32, device=self.device)
        inv = torch.ones(1, device=self.device) if inv is None else inv.reshape(1).to(self.device)
        torch._amp_foreach_non_finite_check_and_unscale_(checked, found, inv)
        return found

    def _count_zeros(self, grads) -> int:
        """Zero entries of the gradients the norm counts, over the world (each entry once, as the norm)."""
        n = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads:
            n += (g == 0).sum()
        return int(clip_grads.global_sum(n, self.dp_group))

    @torch.no_grad()
    def params_norm(self) -> float:
        """The L2 norm of all parameters (fp32 masters), each element counted once in the world as the grad norm
        counts it (Megatron's --log-params-norm). Collective: every rank calls it."""
        counted = [pc.master for pc in self._norm_pieces()]
        return clip_grads.global_norm(clip_grads.sum_of_squares(counted, self.device), self.dp_group)

    def _norm_pieces(self):
        """The pieces whose elements a world-wide norm or count takes, each element once (see clip_grads)."""
        return [pc for pc in self.pieces if pc.in_norm and not pc.replicated]

    def _copy_masters_to_model(self) -> None:
        if self._separate_masters:
            for pc in self.pieces:
                pc.model_view.copy_(pc.master)
        for m in self.chunks:
            m.start_param_sync()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh fp32 masters from the model (after loading model weights without optimizer state)."""
        finish_param_sync(self.chunks)
        if self._separate_masters:
            for pc in self.pieces:
                pc.master.copy_(pc.model_view.float())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """This rank's shard, keyed by ``"{chunk}/{param name}"`` with the element range it covers (CPU copies)."""
        pieces = {}
        for pc in self.pieces:
            st = self.optimizer.state.get(pc.master, {})
            entry = {"start": pc.param_start, "end": pc.param_end, "numel": int(torch.Size(pc.shape).numel()),
                     "shape": list(pc.shape), "master": pc.master.detach().to("cpu", copy=True)}
            for k in self.state_keys:
                if k in st:
                    entry[k] = st[k].detach().to("cpu", copy=True)
            if pc.comm is not None and pc.comm.expert:  # local expert names repeat on every ep rank
                entry["ep_rank"] = ps.get_expert_model_parallel_rank()
            pieces[pc.key] = entry
        return {"format": FORMAT, "zero_stage": [m.zero_stage for m in self.chunks], "dp_size": self.dp_size,
                "dp_rank": self.dp_rank, "step": self.num_steps,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "pieces": pieces}

    def gather_full_state_dict(self) -> dict:
        """The whole optimizer state in parameter space on every dp rank (collective over dp)."""
        own = self.state_dict()
        if self.dp_group is None or all(m.zero_stage == 0 for m in self.chunks):
            return own
        parts = [None] * self.dp_size
        dist.all_gather_object(parts, own, group=self.dp_group)
        index = _index_pieces(parts)
        full = {}
        for key, entries in index.items():
            numel, shape = entries[0]["numel"], entries[0]["shape"]
            by_ep = {}
            for e in entries:
                by_ep.setdefault(e.get("ep_rank"), []).append(e)
            for ep, group in by_ep.items():
                k = key if ep is None else f"{key}@ep{ep}"
                full[k] = _assemble(key, group, 0, numel, self.state_keys if own["step"] > 0 else ())
                full[k].update(start=0, end=numel, numel=numel, shape=shape)
                if ep is not None:
                    full[k]["ep_rank"] = ep
        return dict(own, dp_rank=0, dp_size=1, pieces=full)

    @torch.no_grad()
    def load_state_dict(self, state: Union[dict, Sequence[dict]]) -> None:
        """Load this rank's ranges from one state dict (the same layout, or a full one) or from the list of state
        dicts of all dp ranks of the saved run (any dp size / ZeRO stage)."""
        states = [state] if isinstance(state, dict) else list(state)
        if not states or any(s.get("format") != FORMAT for s in states):
            raise ConfigError("optimizer state is not a megallama ZeRO state dict (format "
                              f"{[s.get('format') for s in states][:2]}); load a checkpoint written by this version")
        index = _index_pieces(states)
        step = int(states[0]["step"])
        my_ep = ps.get_expert_model_parallel_rank()
        for pc in self.pieces:
            entries = index.get(pc.key, []) + index.get(f"{pc.key}@ep{my_ep}", [])
            if pc.comm is not None and pc.comm.expert:
                entries = [e for e in entries if e.get("ep_rank") == my_ep]
            if not entries:
                raise ConfigError(f"optimizer state has no entry for {pc.key}; the checkpoint is for a different "
                                  "model or pipeline layout")
            keys = self.state_keys if step > 0 else ()
            got = _assemble(pc.key, entries, pc.param_start, pc.param_end, keys, describe(self.config))
            pc.master.copy_(got["master"].to(pc.master.device))
            if keys:
                set_state(self.optimizer, pc.master, got, step, keys, self._fused)
            else:
                self.optimizer.state.pop(pc.master, None)
        self.num_steps = step
        saved_groups = {_group_key(g): g for g in states[0]["param_groups"]}  # by kind, not position
        for g in self.optimizer.param_groups:
            saved = saved_groups.get(_group_key(g), {})
            g.update({k: v for k, v in saved.items() if k in ("lr", "weight_decay", "betas", "eps", "momentum")
                      and k in g})
        self._load_grad_scaler(states[0])
        self._copy_masters_to_model()
        finish_param_sync(self.chunks)

    def _load_grad_scaler(self, state: dict) -> None:
        """The dynamic scale and its counters, exactly; across fp16 <-> bf16/fp32 one warning says what is lost
        (Megatron's two warnings). A constant scaler keeps --loss-scale (grad_scaler.py)."""
        saved = state.get("grad_scaler")
        if self.grad_scaler is None:
            if saved and "growth_tracker" in saved:
                warn_rank_0(f"the checkpoint's fp16 loss scale ({saved['scale']:g}) is dropped: this run is not "
                            "--fp16 and needs none")
            return
        if saved:
            self.grad_scaler.load_state_dict(saved)
        elif "grad_scaler" in state and isinstance(self.grad_scaler, DynamicGradScaler):
            warn_rank_0("the checkpoint has no fp16 loss-scale state (a bf16/fp32 run): dynamic loss scaling starts "
                        f"afresh at --initial-loss-scale {float(self.grad_scaler.scale):g}")

    # ------------------------------------------------------------------ accounting
    def memory_footprint(self) -> Dict[str, int]:
        """Bytes of optimizer-owned tensors on this rank: separate fp32 masters and the states (Adam's moments or
        SGD's momentum), by name."""
        seen, out = set(), dict.fromkeys(("master",) + self.state_keys, 0)

        def add(kind, t):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                out[kind] += s.nbytes()
        for buf in self._masters_buffers:
            add("master", buf)
        for st in self.optimizer.state.values():
            for k in self.state_keys:
                if k in st:
                    add(k, st[k])
        return out


def _param_groups(pieces, config: OptimizerConfig) -> List[dict]:
    """Megatron's groups: weight decay for >= 2-D parameters (the schedule scales ``wd_mult``), none for norms and
    biases; with ``decoupled_lr`` the embedding/output layer's pieces in two more, whatever their decay."""
    decoupled = config.decoupled_lr is not None
    ends = {id(pc) for pc in pieces if decoupled and getattr(pc.param, "is_embedding_or_output_parameter", False)}
    groups = []
    for own_lr in ((False, True) if decoupled else (False,)):
        for decay in (True, False):
            groups.append({"params": [pc.master for pc in pieces
                                      if (len(pc.shape) >= 2) == decay and (id(pc) in ends) == own_lr],
                           "weight_decay": config.weight_decay if decay else 0.0, "wd_mult": float(decay),
                           "is_decoupled_lr": own_lr, "lr": config.decoupled_lr if own_lr else config.lr})
    return groups


def _group_key(group: dict) -> tuple:
    return group.get("wd_mult"), bool(group.get("is_decoupled_lr", False))


def _index_pieces(states: Sequence[dict]) -> Dict[str, List[dict]]:
    index: Dict[str, List[dict]] = {}
    for s in states:
        for key, entry in s["pieces"].items():
            index.setdefault(key, []).append(entry)
    return index


def _assemble(key: str, entries: List[dict], start: int, end: int, states=(), optimizer: str = "") -> dict:
    """Elements [start, end) of one parameter's master and ``states``, stitched from overlapping saved pieces."""
    names = ("master",) + tuple(states)
    out = {k: torch.zeros(end - start, dtype=torch.float32) for k in names}
    covered = torch.zeros(end - start, dtype=torch.bool)
    for e in entries:
        a, z = max(start, e["start"]), min(end, e["end"])
        if a >= z:
            continue
        for k in names:
            if k not in e:
                other = [n for n in e if n not in names and torch.is_tensor(e[n]) and e[n].dim() == 1]
                raise ConfigError(f"optimizer state for {key} lacks '{k}'" + (
                    f" (it holds {', '.join(other)}: saved by another optimizer than this run's {optimizer}; pass "
                    "the --optimizer it was trained with)" if other and optimizer else
                    "; the checkpoint is incomplete"))
            out[k][a - start:z - start] = e[k][a - e["start"]:z - e["start"]].float()
        covered[a - start:z - start] = True
    if not bool(covered.all()):
        missing = int((~covered).sum())
        raise ConfigError(f"optimizer state for {key} misses {missing} of elements [{start}, {end}); pass the state "
                          "dicts of all data-parallel ranks of the saved run")
    return out


def get_megatron_optimizer(config: OptimizerConfig, model_chunks: Sequence) -> DistributedOptimizer:
    """One optimizer over all model chunks of this rank (virtual pipeline stages included)."""
    return DistributedOptimizer(config, model_chunks)
