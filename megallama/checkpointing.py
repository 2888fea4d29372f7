"""Atomic, resumable checkpoints loaded with ``torch.load(weights_only=True)``.

Layout (Megatron-like): ``<save>/iter_0000020/rank_00000.pt`` per global rank (its model shard, optimizer shard,
RNG states) plus ``common.pt`` (args as a plain dict, iteration, consumed samples), and
``<save>/latest_checkpointed_iteration.txt``. A checkpoint is written under a temporary directory name and renamed
only once every rank has finished, then the ``latest`` pointer is replaced atomically: a crash mid-save leaves the
previous checkpoint intact and pointed to. Everything saved is tensors, numbers, strings, lists and dicts.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megallama.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def get_rng_state() -> dict:
    """RNG states as tensors so that weights_only loading accepts them."""
    st = {"torch_cpu": torch.get_rng_state(),
          "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch_cpu"])
    if "numpy" in st:
        np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "torch_cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["torch_cuda"])


def args_to_dict(args) -> dict:
    out = {}
    for k, v in vars(args).items():
        if k == "model_config":
            out[k] = v.to_dict()
        elif isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
    return out


def check_writable(save: str) -> None:
    """Fail before training (not at the first save) when --save cannot be written."""
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write_probe{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--save directory {save} is not writable ({e.strerror}); pick a writable path") from None


def save_checkpoint(save: str, iteration: int, model_chunks, optimizer, args, consumed_samples: int,
                    keep_last: Optional[int] = None) -> str:
    final = checkpoint_dir(save, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(save, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    state = {"model": [m.state_dict() for m in model_chunks],
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "rng": get_rng_state()}
    _atomic_torch_save(state, os.path.join(tmp, f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        common = {"iteration": iteration, "consumed_samples": consumed_samples, "args": args_to_dict(args),
                  "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        _atomic_torch_save(common, os.path.join(tmp, "common.pt"))
    _barrier()
    if _rank() == 0:
        if os.path.exists(final):  # re-saving the same iteration: keep the old one until the new one is complete
            old = final + ".old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        tracker_tmp = os.path.join(save, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(save, TRACKER))
        if keep_last:
            _prune(save, keep_last)
    _barrier()
    return final


def _prune(save: str, keep_last: int) -> None:
    iters = sorted(int(d[5:]) for d in os.listdir(save) if d.startswith("iter_") and d[5:].isdigit())
    for it in iters[:-keep_last]:
        shutil.rmtree(checkpoint_dir(save, it), ignore_errors=True)


def read_tracker(load: str) -> Optional[int]:
    path = os.path.join(load, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ConfigError(f"checkpoint tracker {path} is corrupt ('{text[:20]}'); fix or remove it")
    return int(text)


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} is missing; the checkpoint was saved with a different world "
                          "size or is incomplete") from None
    except Exception as e:  # corrupt/truncated file
        raise ConfigError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is corrupt — load an "
                          "earlier iteration") from None


def load_common(load: str, iteration: Optional[int] = None) -> Optional[dict]:
    if not os.path.isdir(load):
        raise ConfigError(f"--load directory {load} does not exist; check the path")
    if iteration is None:
        iteration = read_tracker(load)
        if iteration is None:
            return None
    return _load(os.path.join(checkpoint_dir(load, iteration), "common.pt"))


def check_compatible(common: dict, args, load: str) -> None:
    saved = common["args"].get("model_config", {})
    now = args.model_config.to_dict()
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
            "tie_word_embeddings")
    diff = [k for k in keys if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"checkpoint {load} is for a different model ({common['args'].get('model')}: {k}="
                          f"{saved.get(k)}, this run has {now.get(k)}); load a checkpoint of the same model")


def load_checkpoint(load: str, model_chunks, optimizer, args, finetune: bool = False):
    """Returns (iteration, consumed_samples); (0, 0) when ``load`` holds no checkpoint."""
    common = load_common(load)
    if common is None:
        return 0, 0
    check_compatible(common, args, load)
    it = common["iteration"]
    saved_world = common.get("world_size", 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved_world != world:
        raise ConfigError(f"checkpoint {load} was saved by {saved_world} ranks, this run has {world}; relaunch with "
                          f"{saved_world} ranks or convert it with tools/convert_checkpoint.py")
    state = _load(os.path.join(checkpoint_dir(load, it), f"rank_{_rank():05d}.pt"))
    for m, sd in zip(model_chunks, state["model"]):
        m.load_state_dict(sd)
    if finetune:
        return 0, 0
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return it, common["consumed_samples"]
