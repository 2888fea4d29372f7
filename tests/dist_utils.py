"""Run a function on N processes: the harness of every parallel-equivalence test (CPU ranks over gloo) and of the
multi-GPU tests (``backend="nccl"``: rank r on cuda:r).

``run_distributed(fn, world_size, *args)`` starts ranks from ``torch.multiprocessing``'s forkserver (torch is
imported once in the server rather than once per rank: ~3.5 s of CPU per rank, hundreds of ranks per suite; each
rank gets the caller's current environment, as with ``spawn``), initialises the process group on a free port,
calls ``fn(rank, world_size, *args)`` and re-raises the first rank's failure (with its traceback) here. Values a
rank returns come back through a queue as ``{rank: value}``.
"""
from __future__ import annotations

import functools
import io
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])  # not megallama: modules reading the env on import
    return ctx


def _worker(rank, world_size, port, fn, payload, queue, backend, env):
    os.environ.clear()  # the caller's environment now, not the server's from when it started
    os.environ.update(env)
    args = torch.load(io.BytesIO(payload), weights_only=False)  # our own caller's arguments
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = 1
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", _serialized(out)))
        code = 0
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megallama.mpu import parallel_state
            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is in the parent's pipe (SimpleQueue writes synchronously). Skip interpreter finalisation: gloo
    # threads finishing during it abort the process now and then ("terminate called without an active exception"),
    # seen in CI after a rank had returned and destroyed its group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serialized(value) -> bytes:
    """A rank's arguments or return value as bytes. Through the queue as they are, tensors travel as shared-memory file
    descriptors that the parent fetches from this process's resource-sharer thread, which ``os._exit`` below may
    kill first (seen in CI: ConnectionResetError in the parent's ``queue.get``); bytes need nothing of it."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0, backend: str = "gloo"):
    ctx = _context()
    queue = ctx.SimpleQueue()
    port = free_port()
    payload = _serialized(args)  # as bytes: tensors would each travel as a file descriptor, at most 252 of them
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, payload, queue, backend, dict(os.environ)),
                         daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world_size):
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)  # our own ranks' values
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    for p in procs:
        if p.exitcode not in (0, None):
            raise AssertionError(f"a rank exited with code {p.exitcode}")
    return results


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The project's tensor tolerance metric: ||x - ref|| / ||ref||."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
