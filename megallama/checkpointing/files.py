"""The on-disk life of a checkpoint directory: atomic writes, the size/CRC manifest, the ``latest`` tracker,
finding the newest *good* checkpoint, and pruning (``--keep-last``).

A checkpoint is ``<save>/iter_0000020/`` holding ``common.pt``, one ``rank_XXXXX.pt`` per rank and ``manifest.json``
(size and CRC-32 of every other file). It is written as ``iter_0000020.tmp`` and renamed only once complete, and
``latest_checkpointed_iteration.txt`` is replaced last, so a crash (or a full disk) at any point leaves the previous
checkpoint intact and pointed to. A directory whose manifest is missing or does not match its files is *bad*.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from typing import Dict, List, Optional

import torch

from megallama.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
COMMON = "common.pt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_TMP_RE = re.compile(r"^iter_\d{7}\.tmp$")


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """``write(tmp)`` to a temporary name, fsync, rename: a reader never sees half a file under the final name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _WriteAll:
    """torch.save's sink: writes every byte or raises the OSError (ENOSPC, EFBIG, EIO...). Given a path, torch.save
    reports a full disk as a RuntimeError ("unexpected pos 704 vs 598") that names no cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        try:
            while done < len(view):
                done += self.f.write(view[done:])
        except OSError as e:
            self.error = e
            raise
        return done

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj, path: str) -> None:
    with open(path, "wb") as f:
        sink = _WriteAll(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def atomic_torch_save(obj, path: str) -> None:
    """The directory is not fsynced per file: publish() fsyncs once the whole checkpoint is renamed into place."""
    _atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """A whole file or none: the old one stays whole if the write is interrupted."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)
    _fsync_dir(os.path.dirname(path) or ".")


def file_crc32(path: str, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return crc
            crc = zlib.crc32(b, crc)


def describe_file(path: str) -> dict:
    return {"size": os.path.getsize(path), "crc32": file_crc32(path)}


def write_manifest(ckpt: str, entries: Dict[str, dict]) -> None:
    atomic_write_text(os.path.join(ckpt, MANIFEST), json.dumps({"files": entries}, indent=1, sort_keys=True))


def read_manifest(ckpt: str) -> Optional[Dict[str, dict]]:
    try:
        with open(os.path.join(ckpt, MANIFEST)) as f:
            return json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_files(ckpt: str, manifest: Dict[str, dict], names: Optional[List[str]] = None, crc: bool = True) -> \
        Optional[str]:
    """None when the named files (default all) match the manifest, else why not (for the warning/error)."""
    for name in (sorted(manifest) if names is None else names):
        want = manifest.get(name)
        path = os.path.join(ckpt, name)
        if want is None:
            return f"{name} is not in its manifest"
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']} (truncated or partial)"
        if crc and file_crc32(path) != want["crc32"]:
            return f"{name} fails its CRC-32 check (corrupt)"
    return None


def quick_check(ckpt: str) -> Optional[str]:
    """Cheap test of a whole checkpoint: manifest present, every file there with its size, common.pt's CRC."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable (incomplete save)"
    if COMMON not in manifest:
        return f"{COMMON} is not in its manifest"
    return check_files(ckpt, manifest, crc=False) or check_files(ckpt, manifest, [COMMON], crc=True)


def list_iterations(save: str) -> List[int]:
    try:
        names = os.listdir(save)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, names) if m and os.path.isdir(os.path.join(save, m.group(0))))


def read_tracker(load: str) -> Optional[int]:
    path = os.path.join(load, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        return None  # a corrupt tracker is ignored: the directory listing decides
    return int(text)


def last_saved_iteration(save: str) -> Optional[int]:
    """The iteration a run directory has reached (its tracker, else its newest ``iter_*``); None if it holds no run."""
    tracked = read_tracker(save)
    if tracked is not None:
        return tracked
    iters = list_iterations(save)
    return iters[-1] if iters else None


def holds_checkpoint(path: str) -> bool:
    """``path`` is a run directory with a checkpoint or one ``iter_*`` directory (not a --save still to be made)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, COMMON)) or
                                    last_saved_iteration(path) is not None)


def remove_stale_tmp(save: str, keep: str) -> List[str]:
    """Remove ``iter_*.tmp`` directories of saves killed mid-write (kill -9 leaves them forever otherwise), except
    ``keep``, the one this save writes. Only one run writes a save directory at a time (a second run into it is
    refused unless it resumes it), so any other .tmp belongs to a dead run. Call from the rank that publishes."""
    removed = []
    try:
        names = os.listdir(save)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(save, name)
        if _TMP_RE.match(name) and os.path.abspath(path) != os.path.abspath(keep) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or os.path.dirname(path) == root


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_overwrite_ok(args) -> bool:
    """A --save-adapter folder's adapter may be replaced by the run it belongs to: one that resumes its checkpoint
    (the rule --save follows)."""
    load = getattr(args, "load", None) if args is not None else None
    return bool(load) and not getattr(args, "finetune", False) and holds_checkpoint(load)


def check_adapter_dir(path: str, overwrite_ok: bool) -> None:
    """Refuse a --save-adapter target whose files would be lost: a file, a folder holding anything but an adapter,
    or (unless ``overwrite_ok``) another run's adapter. Read-only."""
    if os.path.isfile(path):
        raise ConfigError(f"--save-adapter {path} is a file; pass a directory for the adapter")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    other = sorted(n for n in os.listdir(path) if n not in ADAPTER_FILES)
    if other:
        raise ConfigError(f"--save-adapter {path} holds other files ({', '.join(other[:3])}); pass a new or empty "
                          "directory for the adapter")
    if not overwrite_ok:
        raise ConfigError(f"--save-adapter {path} already holds an adapter; pass a new directory, or move it away "
                          "first (a run resumed with --load replaces its own)")


def check_save_dir(args) -> None:
    """Refuse a --save directory that already holds a run unless --load resumes that run: the new run would write
    its iter_* over the old ones and reset the tracker. Read-only, so it runs before anything is built or written;
    ``--load X --save X`` (Megatron's auto-resume) passes, also while X is empty or not there yet. The
    --save-adapter folder follows the same rule (``check_adapter_dir``)."""
    if getattr(args, "save_adapter", None):
        check_adapter_dir(args.save_adapter, adapter_overwrite_ok(args))
    save = getattr(args, "save", None)
    last = last_saved_iteration(save) if save and os.path.isdir(save) else None
    if last is None:
        return
    load, finetune = getattr(args, "load", None), getattr(args, "finetune", False)
    if load and _inside(load, save) and not finetune:
        step = getattr(args, "ckpt_step", None)
        if step is not None and step not in list_iterations(save):
            return  # load_checkpoint says which iterations there are
        start = step if step is not None else iteration_of(load)
        later = [i for i in list_iterations(save) if start is not None and i > start]
        if later:  # the resumed run would save its own iterations over these (and move the tracker back)
            raise ConfigError(f"resuming {save} from iteration {start} would overwrite its later checkpoints "
                              f"(iteration{'s' if len(later) > 1 else ''} {', '.join(map(str, later))}); pass "
                              f"another --save directory, or move {'those iterations' if len(later) > 1 else 'it'} "
                              "away first")
        return
    fix = f"drop --finetune and pass --load {save} to resume it" if load and finetune and _inside(load, save) \
        else f"pass --load {save} to resume it"
    raise ConfigError(f"--save directory {save} already holds a run at iteration {last}; {fix}, or choose an empty "
                      "--save directory")


def write_tracker(save: str, iteration: int) -> None:
    atomic_write_text(os.path.join(save, TRACKER), str(iteration))


def publish(tmp: str, final: str) -> None:
    """Rename a finished temporary checkpoint into place; an existing one of the same iteration is replaced only
    after the new one is complete."""
    if os.path.exists(final):
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def prune(save: str, keep_last: int, protect: int) -> List[int]:
    """Delete all but the newest ``keep_last`` good checkpoints (never ``protect``, the one just written)."""
    removed = []
    iters = list_iterations(save)
    keep = set(iters[-keep_last:]) | {protect}
    for it in iters:
        if it not in keep:
            shutil.rmtree(checkpoint_dir(save, it), ignore_errors=True)
            removed.append(it)
    for name in os.listdir(save):  # leftovers of saves killed mid-write
        if name.startswith("iter_") and (name.endswith(".tmp") or name.endswith(".old")):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)
    return removed


def resolve_load_dir(load: str) -> List[str]:
    """Candidate checkpoint directories for ``--load``, best first.

    ``load`` may name one checkpoint (a directory with common.pt/manifest.json): then only that one. Otherwise it is
    a run directory: its ``iter_*`` directories newest first, starting from the tracker's iteration when it names one
    (later ones were never published as latest)."""
    if os.path.isfile(load):
        raise ConfigError(f"--load {load} is a file; pass the checkpoint directory that holds it "
                          f"({os.path.dirname(os.path.abspath(load))}) or its run directory")
    if not os.path.isdir(load):
        raise ConfigError(f"--load directory {load} does not exist; check the path")
    _refuse_megatron_layout(load)  # one of its iteration directories, named
    if os.path.exists(os.path.join(load, COMMON)) or os.path.exists(os.path.join(load, MANIFEST)):
        return [load]
    iters = list_iterations(load)
    from megallama.checkpointing.hf_config import is_hf_model_dir
    if not iters and is_hf_model_dir(load):  # training it would start from random weights
        raise ConfigError(f"{load} is an HF model folder, not a megallama checkpoint; convert it with "
                          f"tools/convert_checkpoint.py hf-to-megallama --hf-dir {load} --output DIR (then --load DIR), "
                          f"or fine-tune from it with finetune_llama.py --pretrained-checkpoint {load}")
    tracked = read_tracker(load)
    if tracked is not None and tracked in iters:
        iters = [i for i in iters if i <= tracked]
    found = [checkpoint_dir(load, i) for i in reversed(iters)]
    for ckpt in found[:1]:
        _refuse_megatron_layout(ckpt)
    return found


def _refuse_megatron_layout(ckpt: str) -> None:
    """A Megatron-LM checkpoint (same iter_NNNNNNN naming) would otherwise read as an incomplete save of ours."""
    if os.path.exists(os.path.join(ckpt, MANIFEST)):
        return
    names = os.listdir(ckpt)
    if any(n.startswith("mp_rank_") for n in names):
        kind = "torch"
    elif "metadata.json" in names and any(n.endswith(".distcp") for n in names):
        kind = "torch_dist"
    else:
        return
    raise ConfigError(f"{ckpt} is a Megatron-LM checkpoint (--ckpt-format {kind}), which megallama does not read; "
                      f"export its weights to an HF folder and convert that with tools/convert_checkpoint.py "
                      f"hf-to-megallama (or fine-tune from it with finetune_llama.py --pretrained-checkpoint)")


def tracker_gap(load: str, ckpt: str) -> Optional[str]:
    """Why ``ckpt`` is not the iteration ``load``'s tracker names, when that iteration's directory is missing (the
    newest one present is used then, as ``resolve_load_dir`` orders them): said so that no reader uses another
    iteration unsaid. None when the tracker's iteration is the one used, or ``load`` names one checkpoint."""
    tracked = read_tracker(load) if os.path.isdir(load) else None
    used = iteration_of(ckpt)
    if tracked is None or used is None or used == tracked or tracked in list_iterations(load):
        return None
    missing = os.path.basename(checkpoint_dir(load, tracked))
    return (f"{os.path.join(load, TRACKER)} names iteration {tracked}, but {missing} is missing; using iteration "
            f"{used} ({ckpt}), the newest there")


def iteration_of(ckpt: str) -> Optional[int]:
    m = _ITER_RE.match(os.path.basename(os.path.normpath(ckpt)))
    return int(m.group(1)) if m else None
