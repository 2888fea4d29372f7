"""Megatron's profiling flags: ``--profile`` over iterations [--profile-step-start, --profile-step-end) on
``--profile-ranks``, as an Nsight Systems range (``cudaProfilerStart``/``Stop`` with NVTX ranges, for
``nsys profile --capture-range=cudaProfilerApi``) or, with ``--use-pytorch-profiler``, a torch.profiler trace written
to ``--tensorboard-dir`` (TensorBoard's profiler plugin, or chrome://tracing / Perfetto); and
``--record-memory-history``, the CUDA allocator's history dumped to ``--memory-snapshot-path`` at every
``--log-interval`` (https://pytorch.org/memory_viz). megallama's own ``--profile-step N`` (a top-kernels table of
one iteration) is in profiling.py.
"""
from __future__ import annotations

import torch

from megallama.errors import ConfigError


def check_profile_flags(args) -> None:
    if not args.profile:
        if args.use_pytorch_profiler:
            raise ConfigError("--use-pytorch-profiler needs --profile")
        return
    start, end = args.profile_step_start, args.profile_step_end
    if not 0 <= start < end:
        raise ConfigError(f"--profile-step-start {start} must be >= 0 and below --profile-step-end {end}")
    if args.use_pytorch_profiler and not args.tensorboard_dir:
        raise ConfigError("--use-pytorch-profiler writes its trace into --tensorboard-dir; give one")
    if not args.use_pytorch_profiler and args.device == "cpu":
        raise ConfigError("--profile without --use-pytorch-profiler marks an Nsight Systems range, which needs "
                          "CUDA; add --use-pytorch-profiler for a torch.profiler trace on CPU")
    if args.record_memory_history and args.device == "cpu":
        raise ConfigError("--record-memory-history records the CUDA allocator; it has nothing to record on CPU")


class MegatronProfiler:
    """``start(iteration)`` before each iteration and ``step(iteration)`` after it, 0-based like Megatron's loop
    counter (iteration i runs step i + 1); ``close()`` at the end of training."""

    def __init__(self, args, device: torch.device, rank: int):
        self.args, self.device = args, device
        self.on = bool(args.profile) and rank in set(args.profile_ranks)
        self._torch_prof, self._nvtx = None, None
        self.memory = bool(getattr(args, "record_memory_history", False)) and device.type == "cuda"
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        if self.on and args.use_pytorch_profiler:
            from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
            start, end = args.profile_step_start, args.profile_step_end
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self._torch_prof = profile(activities=acts, record_shapes=True, with_stack=True,
                                       schedule=schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0,
                                                         active=end - start, repeat=1),
                                       on_trace_ready=tensorboard_trace_handler(args.tensorboard_dir))
            self._torch_prof.start()

    def begin(self, iteration: int) -> None:
        if self.on and not self.args.use_pytorch_profiler and iteration == self.args.profile_step_start:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()

    def end(self, iteration: int, log_now: bool) -> None:
        if self._torch_prof is not None:
            self._torch_prof.step()
        if self._nvtx is not None and iteration + 1 == self.args.profile_step_end:
            torch.cuda.synchronize(self.device)
            self._nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            self._nvtx = None
        if self.memory and log_now:
            self.dump_memory()

    def dump_memory(self) -> None:
        import pickle
        from megallama.checkpointing.files import atomic_write_bytes
        atomic_write_bytes(self.args.memory_snapshot_path, pickle.dumps(torch.cuda.memory._snapshot()))

    def close(self) -> None:
        if self._torch_prof is not None:
            self._torch_prof.stop()
            self._torch_prof = None
        if self._nvtx is not None:
            self._nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            self._nvtx = None
        if self.memory:
            torch.cuda.memory._record_memory_history(enabled=None)
