"""Process-group setup from torchrun's environment, device choice, seeds, and the parallel grid."""
from __future__ import annotations

import atexit
import os
import random
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps


def initialize_distributed(backend: str | None = None, device: str | None = None,
                           timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kw = dict(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
        atexit.register(shutdown_distributed)  # every entry point (CLI, API, examples), not only the scripts
    return dev


def initialize_megatron(args) -> torch.device:
    """Distributed init + grid + seeds; validates the layout before any group is made."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    ps.validate_grid(world, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     args.context_parallel_size, args.expert_model_parallel_size, model_config=args.model_config)
    minutes = getattr(args, "distributed_timeout_minutes", 30.0)  # the world group and every subgroup
    dev = initialize_distributed(args.distributed_backend, args.device, minutes)
    if dist.is_initialized():
        vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)  # set by derive_pipeline
        if vpp is None and args.num_layers_per_virtual_pipeline_stage:
            per_stage = args.model_config.num_layers // args.pipeline_model_parallel_size
            vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
        ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     virtual_pipeline_model_parallel_size=vpp,
                                     context_parallel_size=args.context_parallel_size,
                                     expert_model_parallel_size=args.expert_model_parallel_size,
                                     model_config=args.model_config,
                                     timeout=timedelta(minutes=minutes),
                                     create_gloo_process_groups=not getattr(args, "disable_gloo_process_groups",
                                                                            False))
    set_seed(args.seed)
    return dev


def set_seed(seed: int) -> None:
    """Same seed on every rank: data order and init are layout-independent by construction."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    try:
        from megallama.mpu.random import model_parallel_seed
        model_parallel_seed(seed)
    except Exception:  # pragma: no cover - tracker is optional for the loop
        pass


def shutdown_distributed() -> None:
    """Tear the groups down before the interpreter does: gloo's worker threads still holding work at
    finalisation abort the process (``terminate called without an active exception``) after a good run."""
    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def interrupted_line(e: KeyboardInterrupt) -> str:
    """Ctrl-C as one line: pretrain's TrainingInterrupted says where it stopped; earlier, nothing was trained."""
    return str(e) or "interrupted before training started"


def run_script(body) -> int:
    """The scripts' ``main``: run ``body()``, print a user mistake as one line from rank 0 (exit 2), Ctrl-C as one
    line (exit 130, no traceback), a collective that failed because another rank died or stalled as one line
    (exit 1; any other exception keeps its traceback), and always leave the process group cleanly."""
    try:
        body()
    except ConfigError as e:
        report_config_error(e)
        return 2
    except KeyboardInterrupt as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_line(e), file=sys.stderr, flush=True)
        return 130
    except RuntimeError as e:
        from megallama.collective_errors import lost_contact_line
        line = lost_contact_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)  # every survivor: rank 0 may be the one that died
        _record_for_torchrun(e, line)
        return 1
    finally:
        shutdown_distributed()
    return 0


def report_config_error(e: ConfigError) -> None:
    """A user mistake as one line from rank 0 (every rank sees the same mistake; say it once), and in torchrun's
    failure summary; the argument parser's errors too (``arg_parser.OneLineErrorParser``)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    _record_for_torchrun(e)


def _record_for_torchrun(e: Exception, line: str | None = None) -> None:
    """A mistake only some ranks make (e.g. one stage's modules) would leave no line when rank 0 is not among
    them: under torchrun each rank writes its error to TORCHELASTIC_ERROR_FILE, and torchrun's failure summary
    names the first failing rank with its message (``@record``'s file format), without a line per rank on stderr.
    Its "traceback" is the one line too: a user mistake is not a crash, and a Python stack would bury the message.
    ``line``: what to show instead of ``Type: message``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        import json
        import time
        line = line or f"{type(e).__name__}: {e}"
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    except Exception:  # the summary is a courtesy: never turn a user mistake into a crash
        pass


def launch_rank() -> int:
    """This process's rank as torchrun's environment says it (RANK, else LOCAL_RANK; 0 outside torchrun), for what
    is said once before any process group exists (--help, the subcommand list)."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def is_last_rank() -> bool:
    """Megatron's: the last rank, a last pipeline stage (it has the loss): it prints the training log and writes
    TensorBoard and W&B."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(*a, **kw) -> None:
    """One-time messages (start-up, configuration, saves): rank 0's, as Megatron's."""
    if is_rank_0():
        print(*a, **kw, flush=True)


def print_rank_last(*a, **kw) -> None:
    """The per-iteration log (training line, validation report, timers): the last rank's, as Megatron's, so that
    under pipeline parallelism it comes from a stage that holds the loss."""
    if is_last_rank():
        print(*a, **kw, flush=True)


def warn_rank_0(msg: str) -> None:
    """``warning: msg`` on stderr from one rank, before the process group exists too (argument parsing, opening a
    checkpoint for generation or conversion on every rank): torchrun's RANK then."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)
