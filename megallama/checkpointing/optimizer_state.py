"""Optimizer state by parameter name, so it reshards like the weights.

Per-parameter states (Adam's ``exp_avg``/``exp_avg_sq``, an fp32 master copy) are saved as tensors shaped like the
parameter's local TP shard under ``optimizer/<key>/<param name>``; they then load into any tp/pp/dp/ZeRO layout
through the same index as the weights. Step counts and loss-scaler values are plain numbers in ``common.pt``.

Two kinds of optimizer are understood:
- a plain ``torch.optim.Optimizer`` over the model's parameters (``optimizer.state[param]``);
- one that exposes ``sharded_state_dict(model_chunks) -> {"params": {name: {key: tensor}}, "scalars": {...}}`` and
  ``load_sharded_state_dict(model_chunks, state)`` with the same shape — the ZeRO optimizer gathers its dp shards
  into full local-TP tensors there (and scatters them back on load), so a checkpoint does not depend on dp or stage.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from megallama.checkpointing.state import TIED_COPY, canonical_name, unwrap

PREFIX = "optimizer"


def state_name(key: str, param_name: str) -> str:
    return f"{PREFIX}/{key}/{param_name}"


def _param_names(model_chunks) -> Dict[torch.nn.Parameter, str]:
    names = {}
    for chunk in model_chunks:
        for name, p in unwrap(chunk).named_parameters():
            names[p] = name
    return names


def optimizer_states(optimizer, model_chunks) -> Tuple[Dict[str, Dict[str, torch.Tensor]], dict]:
    """({local param name: {state key: tensor like the local param}}, scalars). Scalar tensors such as Adam's
    per-parameter ``step`` go to scalars (one value; they are equal for every parameter)."""
    if optimizer is None:
        return {}, {}
    if hasattr(optimizer, "sharded_state_dict"):
        st = optimizer.sharded_state_dict(model_chunks)
        return st.get("params", {}), dict(st.get("scalars", {}))
    names = _param_names(model_chunks)
    per_param, scalars = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            name = names[p]
            for key, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                    per_param.setdefault(name, {})[key] = v
                elif torch.is_tensor(v) and v.numel() == 1:
                    scalars[key] = float(v.item())
                elif isinstance(v, (int, float)):
                    scalars[key] = v
    return per_param, scalars


def load_optimizer_states(optimizer, model_chunks, read: Callable[[str, str, torch.Tensor, torch.nn.Parameter], bool],
                          scalars: dict, keys) -> None:
    """Fill the optimizer from a checkpoint. ``read(key, canonical param name, out, param)`` copies the state
    ``key`` of that parameter into ``out`` (the local shard) and returns False when the checkpoint lacks it."""
    if optimizer is None:
        return
    if hasattr(optimizer, "load_sharded_state_dict"):
        params = {}
        for chunk in model_chunks:
            for name, p in unwrap(chunk).named_parameters():
                st = {}
                for key in keys:
                    out = torch.empty(p.shape, dtype=torch.float32)
                    if read(key, canonical_name(name), out, p):
                        st[key] = out
                params[name] = st
        optimizer.load_sharded_state_dict(model_chunks, {"params": params, "scalars": scalars})
        return
    names = _param_names(model_chunks)
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[p]
            st = {}
            for key in keys:
                out = torch.empty_like(p, device="cpu")
                if read(key, canonical_name(name), out, p):
                    st[key] = out.to(p.device)
            if not st:
                continue
            if "step" in scalars:
                on_device = group.get("fused") or group.get("capturable")
                st["step"] = torch.tensor(float(scalars["step"]), dtype=torch.float32,
                                          device=p.device if on_device else "cpu")
            optimizer.state[p] = st


def saved_keys(index: Dict[str, dict]) -> list:
    return sorted({name.split("/")[1] for name in index if name.startswith(PREFIX + "/")})


def skip_on_save(name: str) -> bool:
    return name == TIED_COPY
