"""Optimizer state by parameter name, so it reshards like the weights.

Per-parameter states (Adam's ``exp_avg``/``exp_avg_sq`` or SGD's ``momentum_buffer``: the optimizer's
``state_keys``; and the fp32 ``master`` when the model is bf16/fp16) are
saved as ``optimizer/<key>/<param name>``: pieces of the tp-local parameter's shape, or for ZeRO the element range
of it that a dp rank owns (``Piece.flat``). They load into any tp/pp/dp/ZeRO layout through the same index as the
weights. Step count and loss-scaler state are plain values in ``common.pt``.

Two optimizers are understood:
- megallama's ``DistributedOptimizer`` (``state_dict()`` = this rank's pieces in parameter space, keyed
  ``"{chunk}/{param name}"`` with element ranges; ``load_state_dict`` takes pieces covering this rank's ranges): each
  dp rank writes only its own shard (stage 0: dp rank 0), so saving needs no gather;
- a plain ``torch.optim.Optimizer`` over the model's parameters (tests, tools).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from megallama.checkpointing.state import TIED_COPY, canonical_name, is_replica_chunk, local_piece, unwrap, writes
from megallama.errors import ConfigError

PREFIX = "optimizer"
_MOMENTS = ("exp_avg", "exp_avg_sq")  # what an optimizer that does not name its ``state_keys`` keeps (AdamW)


def _state_keys(optimizer) -> tuple:
    return tuple(getattr(optimizer, "state_keys", _MOMENTS))


def state_name(key: str, param_name: str) -> str:
    return f"{PREFIX}/{key}/{param_name}"


def saved_keys(index: Dict[str, dict]) -> list:
    return sorted({name.split("/")[1] for name in index if name.startswith(PREFIX + "/")})


def skip_on_save(name: str) -> bool:
    return name == TIED_COPY


def _is_zero(optimizer) -> bool:
    return optimizer is not None and hasattr(optimizer, "gather_full_state_dict")


def _params(model_chunks) -> List[Dict[str, torch.nn.Parameter]]:
    return [dict(unwrap(c).named_parameters()) for c in model_chunks]


def optimizer_entries(optimizer, model_chunks) -> Tuple[list, dict]:
    """([(saved name, tensor, piece)] this rank writes, scalars)."""
    if optimizer is None:
        return [], {}
    params = _params(model_chunks)
    out = []
    if _is_zero(optimizer):
        sd = optimizer.state_dict()
        stages = sd["zero_stage"]
        for key, e in sd["pieces"].items():
            ci, name = key.split("/", 1)
            ci = int(ci)
            p = params[ci][name]
            if skip_on_save(name) or is_replica_chunk(model_chunks, ci) or \
                    not writes(p, replicated_over_dp=stages[ci] == 0):
                continue
            box = local_piece(None, p, shape=e["shape"])
            entire = e["start"] == 0 and e["end"] == e["numel"]
            for k in _state_keys(optimizer) + (("master",) if p.dtype != torch.float32 else ()):
                if k in e:
                    out.append((state_name(k, name), e[k].view(e["shape"]) if entire else e[k],
                                box if entire else box.with_flat(e["start"], e["end"])))
        return out, {"step": int(sd["step"]), "grad_scaler": sd.get("grad_scaler")}
    # plain torch optimizer: replicated over dp
    names = {p: n for chunk in params for n, p in chunk.items()}
    replica = {p for ci, chunk in enumerate(params) if is_replica_chunk(model_chunks, ci) for p in chunk.values()}
    scalars = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[p]
            for key, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                    if not skip_on_save(name) and p not in replica and writes(p):
                        out.append((state_name(key, name), v, local_piece(v, p)))
                elif torch.is_tensor(v) and v.numel() == 1:
                    scalars[key] = float(v.item())
    return out, scalars


def _other_optimizer(optimizer, k: str, saved) -> ConfigError:
    """The checkpoint holds none of state ``k`` for any parameter: another --optimizer (or --sgd-momentum 0)."""
    from megallama.optimizer.torch_optimizer import describe
    kept = ", ".join(x for x in saved if x != "master") or "no state but the weights"
    return ConfigError(f"it holds no '{k}' for this run's {describe(optimizer.config)}, only {kept}: it was saved "
                       "with another --optimizer or --sgd-momentum; pass the ones it was trained with, or "
                       "--no-load-optim to go on with a fresh optimizer")


ReadFn = Callable[[str, torch.Tensor, torch.nn.Parameter], bool]


def load_optimizer_states(optimizer, model_chunks, read: ReadFn, scalars: dict, keys) -> None:
    """Fill the optimizer from a checkpoint. ``read(saved name, out, param)`` copies that tensor's slice for this
    rank (``out`` is tp-local shaped) and returns False when the checkpoint lacks it."""
    if optimizer is None:
        return
    params = _params(model_chunks)
    if _is_zero(optimizer):
        own = optimizer.state_dict()
        step = int(scalars.get("step", 0))
        pieces = {}
        for key, e in own["pieces"].items():
            ci, name = key.split("/", 1)
            p, cname = params[int(ci)][name], canonical_name(name)
            entry = {k: v for k, v in e.items() if k in ("start", "end", "numel", "shape", "ep_rank")}
            local = torch.empty(e["shape"], dtype=torch.float32)
            for k in ("master",) + (_state_keys(optimizer) if step > 0 else ()):
                if not read(state_name(k, cname), local, p):
                    if k != "master" and k not in keys:
                        raise _other_optimizer(optimizer, k, keys)
                    if k != "master" or not read(cname, local, p):  # fp32 models: the weights are the master
                        raise ConfigError(f"it holds no optimizer state {state_name(k, cname)}: this run trains "
                                          "parameters the saved run did not (another --strategy, --lora-* or "
                                          "frozen set?); pass the flags it was trained with, or --no-load-optim to "
                                          "go on with a fresh optimizer")
                entry[k] = local.reshape(-1)[e["start"]:e["end"]].clone()
            pieces[key] = entry
        state = dict(own, step=step, pieces=pieces)
        state["grad_scaler"] = scalars.get("grad_scaler")  # None: a bf16/fp32 checkpoint (fp16 says it starts afresh)
        optimizer.load_state_dict(state)
        return
    names = {p: n for chunk in params for n, p in chunk.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = {}
            for key in keys:
                out = torch.empty_like(p, device="cpu")
                if read(state_name(key, canonical_name(names[p])), out, p):
                    st[key] = out.to(p.device)
            if not st:
                continue
            if "step" in scalars:
                on_device = group.get("fused") or group.get("capturable")
                st["step"] = torch.tensor(float(scalars["step"]), dtype=torch.float32,
                                          device=p.device if on_device else "cpu")
            optimizer.state[p] = st
