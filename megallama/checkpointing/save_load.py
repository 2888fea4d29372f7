"""save_checkpoint / load_checkpoint: what the training loop calls.

Save (its phases are in save_request.py; async_save.py runs the writing in the background): every rank writes
``rank_XXXXX.pt`` (the tensors it owns, by name, plus its RNG states and gradient-compression state) into
``iter_N.tmp``; rank 0 merges the ranks' piece lists into the index in ``common.pt`` (with args, iteration,
consumed samples, layout, optimizer scalars), writes the manifest, renames the directory and updates the tracker.
Any rank's write failure (a full disk, a read-only directory) is agreed on by all ranks, the temporary directory is
removed and a ConfigError names the cause: earlier checkpoints are never touched.

Load: the newest checkpoint whose manifest matches its files wins (a bad one is skipped with a warning naming it;
a bad one named directly is an error); each rank reads its slices of every tensor whatever the saved layout was.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megallama.checkpointing import files as F
from megallama.checkpointing.compat import (BEHAVIOUR_KEYS, SHAPE_KEYS, STRATEGY_MARKERS,  # noqa: F401
                                            check_compatible, layout_change, unused_message)
from megallama.checkpointing.optimizer_state import load_optimizer_states, saved_keys, state_name
from megallama.checkpointing.sharded import ShardReader
from megallama.checkpointing.state import canonical_name, is_zero3, local_piece, named_model_tensors, set_rng_state
from megallama.errors import ConfigError
from megallama.initialize import warn_rank_0 as _warn
from megallama.mpu import parallel_state as ps
from megallama.optimizer.compression import load_compression_state

FORMAT_VERSION = 2


# ---------------------------------------------------------------- collectives that work without a process group
def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _on() else 0


def _world() -> int:
    return dist.get_world_size() if _on() else 1


def _all_gather(obj) -> list:
    if not _on():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _bcast(obj):
    if not _on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(err: Optional[str]) -> Optional[str]:
    return next((e for e in _all_gather(err) if e), None)


def _say(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def current_layout() -> dict:
    return {"world_size": _world(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "ep": ps.get_expert_model_parallel_world_size()}


def is_same_layout(saved: Optional[dict]) -> bool:
    """Whether this run has the layout a checkpoint was saved with, so that each rank may take its own RNG and
    compression file. A checkpoint written before ``ep`` was recorded is taken as ep 1."""
    return saved is not None and {"ep": 1, **saved} == current_layout()


def args_to_dict(args) -> dict:
    """The run's arguments as plain values (``weights_only`` loads them)."""
    out = {}
    for k, v in vars(args).items():
        if k == "model_config":
            out[k] = v.to_dict()
        elif _plain(v):  # scalars, lists of them, and dicts of both (hf_token_ids: eos_token_id may be a list)
            out[k] = _plain_copy(v)
    return out


def _plain(v, depth: int = 0) -> bool:
    if isinstance(v, (int, float, str, bool, type(None))):
        return True
    if depth > 1:
        return False
    if isinstance(v, (list, tuple)):
        return all(isinstance(x, (int, float, str, bool)) for x in v)
    return isinstance(v, dict) and all(isinstance(x, str) and _plain(y, depth + 1) for x, y in v.items())


def _plain_copy(v):
    if isinstance(v, (list, tuple)):
        return list(v)
    return {x: _plain_copy(y) for x, y in v.items()} if isinstance(v, dict) else v


_made_save_dirs: dict = {}  # --save path -> the directories check_writable created for it (deepest last)


def check_writable(save: str) -> None:
    """Fail before training (not at the first save) when --save cannot be written. The directories it creates are
    remembered, so that a run refused later leaves none of them behind (``discard_new_save_dir``)."""
    made, at = [], os.path.abspath(save)
    while not os.path.exists(at) and os.path.dirname(at) != at:
        made.insert(0, at)
        at = os.path.dirname(at)
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write_probe{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--save directory {save} is not writable ({e.strerror}); pick a writable path") from None
    finally:
        _made_save_dirs[os.path.abspath(save)] = [d for d in made if os.path.isdir(d)]


def discard_new_save_dir(save: Optional[str]) -> None:
    """Remove the --save directories this process's ``check_writable`` created, while they are still empty (a run
    refused after the check, or one that saved nothing): never one that existed before, never one holding a file."""
    for d in reversed(_made_save_dirs.pop(os.path.abspath(save), []) if save else []):
        try:
            os.rmdir(d)  # only an empty directory: another rank's or run's files keep it
        except OSError:
            return


# ---------------------------------------------------------------- save
def save_checkpoint(save: str, iteration: int, model_chunks, optimizer, args, consumed_samples: int,
                    keep_last: Optional[int] = None, extra: Optional[dict] = None, scheduler=None) -> str:
    """Write and publish the checkpoint of ``iteration`` (collective), the three phases of save_request back to back;
    a save still in flight (--async-save) is published first."""
    from megallama.checkpointing.async_save import finalize_async_save
    from megallama.checkpointing.save_request import SaveRequest
    finalize_async_save()
    req = SaveRequest.begin(save, iteration, model_chunks, optimizer, args, consumed_samples, keep_last, extra,
                            scheduler)
    req.write()
    return req.publish()


# ---------------------------------------------------------------- load
def load_common(ckpt: str) -> dict:
    path = os.path.join(ckpt, F.COMMON)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} is missing; load another checkpoint") from None
    except Exception as e:  # noqa: BLE001 - corrupt file
        raise ConfigError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is corrupt — load an "
                          "earlier iteration") from None


def _model_plan(model_chunks, reader: ShardReader, ckpt: str, common: dict, pretrained: bool = False):
    """What to read for each model tensor of this rank; refused (on every rank alike) when the checkpoint lacks one
    of them, or holds model tensors no rank has a place for (a LoRA run's adapters, experts: they would be dropped
    without a word)."""
    plan, missing, used = [], [], set()
    for ci, name, t, p in named_model_tensors(model_chunks):
        cname = canonical_name(name)
        used.add(cname)
        if cname not in reader:
            missing.append(cname)
            continue
        plan.append((ci, name, cname, t, local_piece(t, p)))
    everywhere = set().union(*(set(u) for u in _all_gather(sorted(used))))
    unused = [n for n in common["index"] if "/" not in n and n not in everywhere]
    err = None
    if unused:
        err = unused_message(ckpt, unused, common.get("args", {}), pretrained)
    elif missing:
        cname = missing[0]
        if any(k in cname for k in STRATEGY_MARKERS):  # a strategy adds these to dense weights
            err = (f"checkpoint {ckpt} has no tensor {cname}: it holds a model without this run's LoRA adapters / "
                   "experts; to add them to its weights pass it as --pretrained-checkpoint (--load resumes a run of "
                   "this strategy)")
        else:
            err = f"checkpoint {ckpt} has no tensor {cname}; it is of another model — load a checkpoint of this model"
    err = _first_error(err)
    if err:
        raise ConfigError(err)
    return plan


def _needed_files(reader: ShardReader, plan, optim_keys, rng_file: Optional[str]) -> list:
    need = set()
    for _, _, cname, t, piece in plan:
        for n in [cname] + [state_name(k, cname) for k in optim_keys]:
            if n in reader:
                need.update(reader.files_for(n, piece))
    if rng_file:
        need.add(rng_file)
    return sorted(need)


def load_checkpoint(load: str, model_chunks, optimizer, args, finetune: bool = False, quiet: bool = False,
                    scheduler=None) -> Tuple[int, int]:
    """Load the newest good checkpoint under ``load`` (or the one ``load`` names) into this rank's chunks and
    optimizer. Returns (iteration, consumed_samples); (0, 0) when there is none (an error with ``finetune``: random
    weights are never what a fine-tuning meant) or with ``finetune``. ``quiet``:
    no "loaded weights" line (the caller says what it loaded). ``scheduler``: its settings are checked against the
    checkpoint's (a resume must not change the LR schedule silently; a finetune starts a fresh one)."""
    from megallama.checkpointing.async_save import finalize_async_save
    finalize_async_save()  # --async-save: a save in flight is published before anything is read
    step = getattr(args, "ckpt_step", None)
    if step is not None:  # Megatron's --ckpt-step: that iteration of the --load run, and no other
        load = _ckpt_step_dir(load, step)
    candidates = _bcast(F.resolve_load_dir(load) if _rank() == 0 else None)
    named = candidates == [load]
    bad = []
    for ckpt in candidates:
        reason = _bcast(F.quick_check(ckpt) if _rank() == 0 else None)
        if reason is None:
            common = load_common(ckpt)
            check_compatible(common, args, ckpt, finetune=finetune)
            reader = ShardReader(ckpt, common["index"])
            pretrained = finetune and getattr(args, "pretrained_checkpoint", None) == load
            try:
                plan = _model_plan(model_chunks, reader, ckpt, common, pretrained)
            except ConfigError:
                reader.close()
                raise
            same_layout = is_same_layout(common.get("layout"))
            no_optim = bool(getattr(args, "no_load_optim", False)) and not finetune
            keys = [] if finetune or no_optim else saved_keys(common["index"])
            manifest = F.read_manifest(ckpt) or {}
            no_rng = bool(getattr(args, "no_load_rng", False))
            # this rank's file: its RNG states and its compressors' error memories (kept under --no-load-rng)
            rng_file = f"rank_{_rank():05d}.pt" if same_layout and not finetune and not (no_rng and no_optim) \
                else None
            rng_file = rng_file if rng_file in manifest else None
            reason = _first_error(F.check_files(ckpt, manifest, _needed_files(reader, plan, keys, rng_file)))
        if reason is not None:
            if named:
                raise ConfigError(f"checkpoint {ckpt} is unusable: {reason}; load an earlier iteration")
            _warn(f"skipping checkpoint {ckpt}: {reason}")
            bad.append(ckpt)
            continue
        gap = F.tracker_gap(load, ckpt) if _rank() == 0 else None
        if gap:  # the newest present is loaded, as before, but not unsaid (the export says it too)
            _warn(gap)
        if not finetune:  # Megatron's: validation goes on after the samples it had read
            args.consumed_valid_samples = int(common.get("args", {}).get("consumed_valid_samples") or 0)
        # an eval-only run (--skip-train) never steps the schedule: another --train-iters there changes nothing;
        # --no-load-optim loads no schedule (Megatron's): it starts afresh, nothing to compare
        if scheduler is not None and not finetune and not no_optim and not getattr(args, "skip_train", False):
            scheduler.load_state_dict(_saved_scheduler(common), getattr(args, "override_opt_param_scheduler", False),
                                      getattr(args, "use_checkpoint_opt_param_scheduler", False))
        return _apply(ckpt, common, reader, plan, model_chunks, optimizer, keys, rng_file, finetune, quiet,
                      no_optim, no_rng)
    if bad:
        raise ConfigError(f"no usable checkpoint in {load} ({len(bad)} bad: {', '.join(map(os.path.basename, bad))})"
                          "; remove --load to start afresh or restore a good checkpoint")
    if finetune:  # fine-tuning random weights is never what was meant
        raise ConfigError(f"no checkpoint in {load} to fine-tune from (--finetune); check the --load path, or drop "
                          "--finetune to train from scratch")
    if getattr(args, "exit_on_missing_checkpoint", False):
        raise ConfigError(f"no checkpoint in {load} (--exit-on-missing-checkpoint); check the --load path, or drop "
                          "the flag to start from scratch")
    _say(f"no checkpoint in {load}; starting from scratch")
    return 0, 0


def _ckpt_step_dir(load: str, step: int) -> str:
    if F.iteration_of(load) is not None:
        load = os.path.dirname(os.path.normpath(load))
    ckpt = F.checkpoint_dir(load, step)
    if not os.path.isdir(ckpt):
        have = F.list_iterations(load)
        raise ConfigError(f"--ckpt-step {step}: {load} has no iteration {step} (it has "
                          f"{', '.join(map(str, have)) if have else 'none'}); pass one of those")
    return ckpt


def _saved_scheduler(common: dict) -> Optional[dict]:
    """The checkpoint's LR schedule: saved by the scheduler, else (older checkpoints) resolved from its args."""
    if "opt_param_scheduler" in common:
        return common["opt_param_scheduler"]
    from megallama.lr_scheduler import settings_from_args
    return settings_from_args(common.get("args", {}))


def _apply(ckpt, common, reader, plan, model_chunks, optimizer, keys, rng_file, finetune, quiet=False,
           no_optim=False, no_rng=False) -> Tuple[int, int]:
    zero3_sd = {}
    with torch.no_grad():
        for ci, name, cname, t, piece in plan:
            reader.read_into(cname, t.data if isinstance(t, torch.nn.Parameter) else t, piece)
            if is_zero3(model_chunks[ci]):
                zero3_sd.setdefault(ci, {})[name] = t
    for ci, sd in zero3_sd.items():  # the wrapper keeps its dp shard of the full tensors
        model_chunks[ci].load_state_dict(sd)
    from megallama.checkpointing.fp8_state import load_fp8_state  # --fp8-recipe delayed: amax histories
    fp8_note = load_fp8_state(model_chunks, reader)
    if fp8_note:
        _say(fp8_note)
    iteration = int(common["iteration"])
    if finetune or not keys:
        if optimizer is not None and hasattr(optimizer, "reload_model_params"):
            optimizer.reload_model_params()  # fp32 master copies must follow the loaded weights
        if no_optim:  # Megatron's --no-load-optim: the run goes on (iteration, data, RNG) with a fresh optimizer
            _say(f"loaded weights from {ckpt} at iteration {iteration}; --no-load-optim: the optimizer starts "
                 "afresh, and so does the LR schedule (from its warmup, with this run's flags), as in Megatron")
            return _apply_rng(ckpt, common, reader, model_chunks, rng_file, no_rng, None)
        if not finetune and iteration > 0 and optimizer is not None:  # Megatron refuses: a fresh Adam is a choice
            reader.close()
            raise ConfigError(f"checkpoint {ckpt} (iteration {iteration}) holds no optimizer state (saved with "
                              "--no-save-optim?); pass --no-load-optim to go on with a fresh optimizer, or "
                              "--finetune to start a new run from its weights")
        if not quiet:
            _say(f"loaded weights from {ckpt}" + (" (finetune: iteration, data and optimizer start afresh)"
                                                   if finetune else ""))
        reader.close()
        return (0, 0) if finetune else (iteration, int(common.get("consumed_samples", 0)))
    def read(saved_name, out, param):
        if saved_name not in reader:
            return False
        reader.read_into(saved_name, out, local_piece(out, param))
        return True

    err = None
    try:
        load_optimizer_states(optimizer, model_chunks, read, dict(common.get("optimizer_scalars", {})), keys)
    except ConfigError as e:  # a rank's missing state: every rank stops alike (no one waits in a collective)
        err = f"checkpoint {ckpt} cannot resume this run's optimizer: {e}"
    err = _first_error(err)
    if err:
        reader.close()
        raise ConfigError(err)
    return _apply_rng(ckpt, common, reader, model_chunks, rng_file, no_rng, "compression")


def _apply_rng(ckpt, common, reader, model_chunks, rng_file, no_rng, compression_key) -> Tuple[int, int]:
    """This rank's RNG states (not under --no-load-rng) and, with the optimizer, the compressors' error memories
    (under --no-load-rng too: they are optimizer state) from its own file."""
    obj = reader.load_object(rng_file) if rng_file else {}
    saved_comp = obj.get(compression_key) if compression_key else None
    if no_rng:
        _say("--no-load-rng: RNG states start from the seed")
    elif rng_file:
        set_rng_state(obj["rng"])
    else:
        what = "weights and optimizer" if compression_key else "weights"  # --no-load-optim: the optimizer is fresh
        _say(f"layout changed since the save ({layout_change(common, current_layout(), model_chunks)}): {what} "
             "resharded; RNG states start from the seed")
    skipped = None if compression_key else "--no-load-optim"
    if compression_key and not rng_file:  # its state is per data-parallel rank: no rank of this layout owns one
        skipped = f"the layout changed since the save ({layout_change(common, current_layout(), model_chunks)})"
    msg = load_compression_state(model_chunks, saved_comp, skipped)
    if msg:
        _say(msg)
    reader.close()
    return int(common["iteration"]), int(common.get("consumed_samples", 0))
