"""Whole-model checkpoints without a process group: what the HF converter writes and reads.

``write_full_checkpoint`` stores full tensors by name in files of bounded size (``model_00000.pt`` ...) with the
same index/manifest/tracker as a training save, so ``--load``/``--finetune`` read it into any layout.
``open_checkpoint`` finds the newest good checkpoint under a path and gives its common dict and a ``ShardReader``
that assembles full tensors from whatever layout saved them.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, Iterable, Optional, Tuple

import torch

from megallama.checkpointing import files as F
from megallama.checkpointing.save_load import FORMAT_VERSION, load_common
from megallama.checkpointing.sharded import ShardReader, dtype_name, whole
from megallama.errors import ConfigError
from megallama.initialize import warn_rank_0 as _warn


def write_full_checkpoint(save: str, named_tensors: Iterable[Tuple[str, torch.Tensor]], args: dict,
                          iteration: int = 0, max_file_bytes: int = 2 << 30,
                          files: Optional[Dict[str, str]] = None) -> str:
    """Write full tensors (streamed: at most ``max_file_bytes`` held at once) as iteration ``iteration``. ``files``
    ({name inside the checkpoint: source path}) are copied in and manifested with it (an imported model's tokenizer:
    the checkpoint must not depend on the folder it came from)."""
    final = F.checkpoint_dir(save, iteration)
    tmp = final + ".tmp"
    try:
        os.makedirs(save, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        index, manifest, batch, size = {}, {}, {}, 0

        def flush():
            nonlocal batch, size
            if not batch:
                return
            fname = f"model_{len(manifest):05d}.pt"
            F.atomic_torch_save({"tensors": batch}, os.path.join(tmp, fname))
            manifest[fname] = F.describe_file(os.path.join(tmp, fname))
            for name, t in batch.items():
                index[name] = {"shape": list(t.shape), "dtype": dtype_name(t),
                               "pieces": [whole(t.shape).to_dict(fname)]}
            batch, size = {}, 0

        for name, t in named_tensors:
            if name in batch or name in index:
                raise ConfigError(f"tensor {name} appears twice in the source checkpoint; it is malformed")
            batch[name] = t.detach().to("cpu").contiguous()
            size += t.numel() * t.element_size()
            if size >= max_file_bytes:
                flush()
        flush()
        for name, src in (files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, name))
            manifest[name] = F.describe_file(os.path.join(tmp, name))
        common = {"format": FORMAT_VERSION, "iteration": iteration, "consumed_samples": 0, "args": args,
                  "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1, "vpp": 1, "ep": 1}, "zero_stage": 0,
                  "index": index, "optimizer_scalars": {}, "extra": {}}
        F.atomic_torch_save(common, os.path.join(tmp, F.COMMON))
        manifest[F.COMMON] = F.describe_file(os.path.join(tmp, F.COMMON))
        F.write_manifest(tmp, manifest)
        F.publish(tmp, final)
        F.write_tracker(save, iteration)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not write checkpoint {final} ({e.strerror or e}); free space or pick another "
                          "output directory") from None
    return final


def open_checkpoint(load: str, verify: bool = True) -> Tuple[str, dict, ShardReader]:
    """(directory, common dict, reader) of the newest good checkpoint under ``load`` (or the one it names). Each bad
    one passed over is a warning line (as training's load says), so a tool never uses an older iteration unsaid."""
    candidates = F.resolve_load_dir(load)
    if not candidates:
        raise ConfigError(f"{load} holds no checkpoint (no iter_* directory); check the path")
    reasons = []
    for ckpt in candidates:
        reason = F.quick_check(ckpt)
        if reason is None and verify:
            reason = F.check_files(ckpt, F.read_manifest(ckpt))
        if reason is None:
            common = load_common(ckpt)
            local_tokenizer(common.get("args", {}), ckpt)
            return ckpt, common, ShardReader(ckpt, common["index"])
        if len(candidates) > 1:
            _warn(f"skipping checkpoint {ckpt}: {reason}")
        reasons.append(f"{os.path.basename(ckpt)}: {reason}")
    raise ConfigError(f"no usable checkpoint in {load} ({'; '.join(reasons)}); restore a good one")


def local_tokenizer(args: dict, ckpt: str) -> dict:
    """``tokenizer_files`` (the tokenizer an HF import copied into its checkpoint) is recorded relative to the
    checkpoint, so that the checkpoint can be moved; made absolute here, where the checkpoint's place is known."""
    rel = args.get("tokenizer_files")
    if rel and not os.path.isabs(rel):
        args["tokenizer_files"] = os.path.join(os.path.abspath(ckpt), rel)
    return args


def saved_args(load: str) -> dict:
    """The arguments the newest good checkpoint under ``load`` (or the one it names) was saved with; no shard is
    read and the reader is closed."""
    _, common, reader = open_checkpoint(load, verify=False)
    reader.close()
    return common.get("args", {})


def model_tensor_names(common: dict) -> list:
    return [n for n in common["index"] if "/" not in n]


def model_config_from_checkpoint(load: str):
    """The ModelConfig a checkpoint was saved with, or an HF model folder's config.json describes
    (``--use-checkpoint-args``)."""
    from megallama.config import ModelConfig
    from megallama.checkpointing.hf_config import hf_config_to_model_config, is_hf_model_dir, read_hf_config
    if os.path.isdir(load) and is_hf_model_dir(load):
        return hf_config_to_model_config(read_hf_config(load), os.path.basename(os.path.normpath(load)))
    ckpt, common, reader = open_checkpoint(load, verify=False)
    reader.close()
    cfg = common.get("args", {}).get("model_config")
    if not cfg:
        raise ConfigError(f"checkpoint {ckpt} records no model config; pass the model flags instead of "
                          "--use-checkpoint-args")
    return ModelConfig.from_dict(cfg).validate()
