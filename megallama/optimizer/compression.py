"""Gradient compression as the data-parallel communication path (``--gradient-compression``).

A compressor is a DDP comm hook (``DistributedDataParallel.register_comm_hook``): called once per bucket per step
with the bucket's local gradient, it leaves the (approximate) dp average there, the same on every rank. ZeRO-1 works
unchanged: the whole bucket is averaged and each rank's optimizer reads its shard. Every compressor keeps error
feedback (what a step's message leaves out is added to the next step's input, so the sum of what was sent tracks
the sum of the gradients with a bounded residual) and runs exact (DDP's own collective) for ``warmup_steps``
optimizer steps first. What error feedback cannot undo is delay: a direction waits in the error until it is among
what a message carries. Under Adam every coordinate moves at about the same speed whatever its gradient's size, so
the small directions count as much as the large ones, and a message that carries few of them (PowerSGD rank 4 of
a 256-wide matrix, top-k 10%) falls behind a fast-learning short run, however well it is chosen (the exact best
rank-4 approximation does too), while under SGD with momentum the same messages keep up (rank 4 +1.4%, top-k 10%
-0.4% on the 4-rank benchmark run): benchmarks/RESULTS.md (gradient compression) has the measurements, and under
AdamW 1-bit Adam (every coordinate's sign, every step) is the one that keeps up at 30x.

* ``powersgd`` (Vogels et al. 2019): each >= 2-D gradient (+ error) becomes a rank-r product, see
  compression_powersgd.py.
* ``topk``: the k = ratio * n largest entries of gradient + error (csrc top-k kernel, the same share of each of
  N owner chunks), sent as (fp32 value, int32 index) pairs by all-gather or, where that sends fewer bytes (dense
  messages, many ranks, always at ZeRO-1), reduce-scattered to the chunks' owners: see compression_topk.py.
* ``onebit``: 1-bit Adam with 0/1 Adam's variance refresh, see compression_onebit.py.

Bytes are counted as one rank sends them in bandwidth-optimal collectives (all-reduce 2(N-1)/N of the buffer,
all-gather (N-1) x its part, all-to-all and reduce-scatter (N-1)/N); the ratio is to what DDP sends for the same
bucket (all-reduce at stage 0, reduce-scatter at stage 1, so at ZeRO-1 a compressed all-reduce saves half as much).
MoE expert buckets (ep > 1) are reduced exact over the expert-data-parallel group, never by the hook: the start-up
log says so, their bytes count in the report, and 1-bit Adam steps them with plain AdamW.
Not supported: ZeRO-2/3 (only a gradient shard is kept; a whole-gradient error buffer per rank would cost more than
the sharding saves, so ZeRO-1 is the stage to compress at) and --fp16 (a changing loss scale corrupts the
error memories). The compressor state (error memories, PowerSGD's Q, 1-bit's momentum and frozen denominator) is
per rank and travels in each rank's checkpoint file, so a resumed run continues bit for bit; under another layout
or other compression flags it starts afresh (``compression_state`` / ``load_compression_state``). It costs every dp
rank 4 bytes per local parameter (1-bit about 12), which ``--no-save-compression-state`` leaves out at scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.ops import compression as kernels
from megallama.optimizer.distributed import hook_reduces
from megallama.optimizer.param_and_grad_buffer import all_gather_into_tensor

METHODS = ("none", "powersgd", "onebit", "topk")


@dataclass
class CompressionConfig:
    method: str = "none"
    rank: int = 4  # PowerSGD rank r
    topk_ratio: float = 0.01  # fraction of each bucket's entries top-k sends
    warmup_steps: int = 0  # exact optimizer steps first (1-bit Adam: the variance warm-up, >= 1)
    chunk_size: int = kernels.DEFAULT_CHUNK_SIZE  # 1-bit: elements per fp32 scale
    variance_refresh: bool = True  # 1-bit: exact steps at warmup + 2^j refresh the frozen variance (0/1 Adam)
    seed: int = 0  # PowerSGD: the initial Q (the same on every rank)
    min_compression_rate: float = 2.0  # PowerSGD: a matrix is sent exact unless rank r shrinks it this much

    def validate(self) -> "CompressionConfig":
        if self.method not in METHODS:
            raise ConfigError(f"--gradient-compression {self.method} is not one of {', '.join(METHODS)}")
        if self.rank < 1:
            raise ConfigError(f"--gradient-compression-rank {self.rank} must be >= 1 (the PowerSGD rank)")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ConfigError(f"--topk-ratio {self.topk_ratio} must be in (0, 1] (the fraction of entries sent)")
        if self.min_compression_rate < 0:
            raise ConfigError(f"PowerSGD min_compression_rate {self.min_compression_rate} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"--compression-warmup-steps {self.warmup_steps} must be >= 0")
        if self.method == "onebit" and self.warmup_steps < 1:
            raise ConfigError("--gradient-compression onebit needs --compression-warmup-steps >= 1: 1-bit Adam "
                              "freezes the variance estimated in the exact warm-up")
        if self.chunk_size <= 0 or self.chunk_size % 8:
            raise ConfigError(f"1-bit chunk size {self.chunk_size} must be a positive multiple of 8")
        return self


def config_from_args(args) -> CompressionConfig:
    """The compression flags, checked against the rest of the run (ZeRO stage, fp16) before anything is built.
    The warm-up defaults to 10% of --train-iters (at least 1)."""
    method = getattr(args, "gradient_compression", None) or "none"
    warmup = getattr(args, "compression_warmup_steps", None)
    if warmup is None:
        warmup = max(1, (getattr(args, "train_iters", None) or 1000) // 10)
    cfg = CompressionConfig(method=method, rank=getattr(args, "gradient_compression_rank", 4),
                            topk_ratio=getattr(args, "topk_ratio", 0.01), warmup_steps=warmup,
                            seed=getattr(args, "seed", 0) or 0).validate()
    if method != "none":
        stage = getattr(args, "zero_stage", 0) or 0
        if stage >= 2:
            raise zero_stage_error(method, stage)
        if getattr(args, "fp16", False):
            raise ConfigError(f"--gradient-compression {method} does not work with --fp16 (a changing loss scale "
                              "corrupts the error-feedback memory); use --bf16")
    return cfg


def zero_stage_error(method: str, stage: int) -> ConfigError:
    """Why ZeRO-2/3 and compression do not mix: stage 2 saves memory by keeping only a gradient shard, and error
    feedback needs a whole-gradient fp32 buffer per rank (1-bit Adam the whole momentum too), more than it saves."""
    return ConfigError(f"--gradient-compression {method} does not work with --zero-stage {stage}: error feedback "
                       f"keeps a full-size fp32 error buffer on every rank, more memory than stage {stage} saves by "
                       "sharding gradients; use --zero-stage 1 (optimizer state sharded, compressed gradients)")


def collective_bytes(kind: str, nbytes: float, world: int) -> float:
    """Bytes one rank sends in a bandwidth-optimal (ring) collective; ``nbytes``: its buffer (all_gather: its part)."""
    if world <= 1:
        return 0.0
    return {"all_reduce": 2.0 * (world - 1) / world * nbytes, "all_gather": float(world - 1) * nbytes,
            "all_to_all": (world - 1) / world * nbytes, "reduce_scatter": (world - 1) / world * nbytes}[kind]


def ddp_collective(ddp) -> str:
    """The collective plain DDP uses for ``ddp``'s gradients: all-reduce at stage 0, reduce-scatter when sharded."""
    return "all_reduce" if ddp.zero_stage == 0 else "reduce_scatter"


def ddp_bytes_per_step(ddp) -> float:
    """What one rank of plain DDP sends per step for ``ddp``'s whole gradient buffer: the baseline of the ratios."""
    return collective_bytes(ddp_collective(ddp), ddp.layout.numel * ddp.grad_buffer.element_size(), ddp.dp_size)


class CommStats:
    """Bytes this rank sent for gradients, and what plain DDP would have sent, since the last report."""

    def __init__(self):
        self.sent = self.baseline = 0.0
        self.steps = 0

    def report(self, reset: bool = True) -> Optional[dict]:
        if not self.steps:
            return None
        out = {"bytes_per_step": self.sent / self.steps, "baseline_bytes_per_step": self.baseline / self.steps,
               "compression_ratio": self.baseline / self.sent if self.sent else float("inf"), "steps": self.steps}
        if reset:
            self.sent = self.baseline = 0.0
            self.steps = 0
        return out


class GradientCompressor:
    """Base comm hook: the exact/compressed switch, state per bucket, skipped-step reset, counted collectives."""

    reset_after_exact = False  # drop the state after an exact step (1-bit re-reads the optimizer's moments)

    def __init__(self, ddp, config: CompressionConfig, optimizer=None):
        self.ddp, self.config, self.optimizer = ddp, config, optimizer
        self.group, self.world = ddp.dp_group, ddp.dp_size
        self.stats = CommStats()
        # MoE expert buckets (ep > 1) are reduced exact over the expert-data-parallel group: the hook never sees
        # them, but their bytes are part of what a step sends (and of what plain DDP would send).
        self.exact_bytes = sum(collective_bytes(ddp_collective(ddp), b.numel * ddp.grad_buffer.element_size(),
                                                b.comm.size) for b in ddp.layout.buckets if not hook_reduces(b))
        self.reset_state()

    def reset_state(self) -> None:
        """Forget every bucket's state (error memories, Q, ...): the next compressed step starts afresh."""
        self.state: Dict[int, dict] = {}  # bucket index -> compressor state
        self._calls: Dict[int, int] = {}
        self._last_step: Dict[int, int] = {}

    def __call__(self, bucket, data: torch.Tensor) -> bool:
        """Average ``data`` (this rank's bucket gradient) over dp in place; False: an exact step, DDP does it."""
        baseline = collective_bytes(ddp_collective(self.ddp), bucket.numel * data.element_size(), self.world)
        self.stats.baseline += baseline
        if bucket.index == 0:
            self.stats.steps += 1
            self.stats.sent += self.exact_bytes
            self.stats.baseline += self.exact_bytes
        # The step count decides exact vs compressed; the optimizer's counts successful steps only.
        step = self.optimizer.num_steps if self.optimizer is not None else self._calls.get(bucket.index, 0)
        self._calls[bucket.index] = self._calls.get(bucket.index, 0) + 1
        if self.exact_step(step):
            self.stats.sent += baseline
            if self.reset_after_exact:
                self.state.pop(bucket.index, None)
            return False
        if self._last_step.get(bucket.index) == step:  # the last step was skipped (non-finite): start afresh
            self.state.pop(bucket.index, None)
        self._last_step[bucket.index] = step
        with torch.no_grad():
            if bucket.index not in self.state:
                self.state[bucket.index] = self.init_state(bucket, data)
            self.compress(bucket, data, self.state[bucket.index])
        return True

    def exact_step(self, step: int) -> bool:
        return step < self.config.warmup_steps

    # ------------------------------------------------------------------ checkpointing
    def signature(self) -> dict:
        """What the saved state is only valid under: the flags that shape it, the dp size and the bucket layout
        (not the warm-up length: extending --train-iters, which moves its default, keeps the state)."""
        c = self.config
        return {"method": c.method, "rank": c.rank, "topk_ratio": c.topk_ratio, "chunk_size": c.chunk_size,
                "min_compression_rate": c.min_compression_rate, "world": self.world,
                "buckets": [[b.offset, b.numel] for b in self.ddp.layout.buckets]}

    def state_dict(self) -> dict:
        """This rank's compressor state, on the CPU (``weights_only``-loadable: tensors, numbers, lists, dicts)."""
        return {"signature": self.signature(), "state": _map_tensors(self.state, lambda t: t.to("cpu", copy=True)),
                "calls": dict(self._calls), "last_step": dict(self._last_step)}

    def load_state_dict(self, sd: dict) -> bool:
        """Restore a ``state_dict``; False (nothing changed) when it was saved under another signature."""
        if sd.get("signature") != self.signature():
            return False
        device = self.ddp.device
        with self.ddp.hook_stream_context():  # owned by the stream the hook runs on (freed there too)
            self.state = _map_tensors(sd["state"], lambda t: t.to(device, copy=True))
        self._calls, self._last_step = dict(sd["calls"]), dict(sd["last_step"])
        return True

    def num_compressed(self) -> int:
        """How many of this chunk's parameters the compressed messages carry (the rest go exact)."""
        return sum(len(b.params) for b in self.ddp.layout.buckets if hook_reduces(b))

    def summary(self, comps: Sequence["GradientCompressor"]) -> str:
        n = sum(c.num_compressed() for c in comps)
        if self.config.method == "topk":
            return f"the top {self.config.topk_ratio:g} of every bucket's entries ({n} parameters)"
        return f"1-bit momentum ({n} parameters)"

    def init_state(self, bucket, data: torch.Tensor) -> dict:
        raise NotImplementedError

    def compress(self, bucket, data: torch.Tensor, st: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ counted collectives
    def all_reduce_mean(self, t: torch.Tensor) -> None:
        self.stats.sent += collective_bytes("all_reduce", t.numel() * t.element_size(), self.world)
        dist.all_reduce(t, group=self.group)
        t.div_(self.world)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's t."""
        self.stats.sent += collective_bytes("all_gather", t.numel() * t.element_size(), self.world)
        out = t.new_empty((self.world,) + tuple(t.shape))
        all_gather_into_tensor(out.view(-1), t.contiguous().view(-1), group=self.group)
        return out

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Row j of t [world, m] goes to rank j; row i of the result came from rank i."""
        self.stats.sent += collective_bytes("all_to_all", t.numel() * t.element_size(), self.world)
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out

    def param_views(self, bucket):
        """(offset in the bucket, shape) of each parameter of the bucket, in buffer order."""
        return sorted((self.ddp.layout.index[p][0] - bucket.offset, tuple(self.ddp.shapes[p]))
                      for p in bucket.params)


def _compressor_class(method: str):
    if method == "onebit":
        from megallama.optimizer.compression_onebit import OneBitCompressor
        return OneBitCompressor
    if method == "powersgd":
        from megallama.optimizer.compression_powersgd import PowerSGDCompressor
        return PowerSGDCompressor
    from megallama.optimizer.compression_topk import TopKCompressor
    return TopKCompressor


def attach_gradient_compression(model_chunks, optimizer, config: CompressionConfig) -> List[GradientCompressor]:
    """Register the compressor as the comm hook of every DDP chunk (1-bit also swaps the optimizer's AdamW for
    ``OneBitAdamW``). Nothing to do for ``none`` or without data parallelism. Returns the compressors."""
    config.validate()
    if config.method == "none":
        return []
    for ddp in model_chunks:
        if ddp.zero_stage >= 2:
            raise zero_stage_error(config.method, ddp.zero_stage)
    if all(ddp.dp_size == 1 for ddp in model_chunks):
        return []
    if config.method == "onebit":
        from megallama.optimizer.compression_onebit import install_onebit_adam
        install_onebit_adam(optimizer, config.warmup_steps, config.variance_refresh)
    cls = _compressor_class(config.method)
    comps = []
    for ddp in model_chunks:
        comp = cls(ddp, config, optimizer)
        ddp.register_comm_hook(comp)
        comps.append(comp)
    from megallama.initialize import print_rank_0, warn_rank_0
    for line in describe(comps):
        print_rank_0(line)
    if config.method == "powersgd" and not any(c.num_compressed() for c in comps):
        warn_rank_0(f"--gradient-compression powersgd at --gradient-compression-rank {config.rank} compresses none "
                    f"of the gradients (at that rank no matrix shrinks {config.min_compression_rate:g}x: small "
                    "matrices, LoRA adapters) and sends them all exact; lower --gradient-compression-rank or use "
                    "--gradient-compression topk/onebit")
    return comps


def describe(comps: Sequence[GradientCompressor]) -> List[str]:
    """What the log says once at start-up: which gradients are compressed and which go exact (this rank)."""
    c = comps[0].config
    exact = f"exact for the first {c.warmup_steps} optimizer steps" + (
        f" and at steps {c.warmup_steps} + 2^j (variance refresh)" if c.method == "onebit" and c.variance_refresh
        else "")
    lines = [f"gradient compression {c.method}: {exact}, then {comps[0].summary(comps)}"]
    experts = [comp.ddp.shapes[p].numel() for comp in comps for b in comp.ddp.layout.buckets
               if not hook_reduces(b) for p in b.params]
    if experts:
        lines.append(f"gradient compression {c.method}: the {len(experts)} MoE expert parameters ({sum(experts)} "
                     "elements) are reduced exact over the expert-data-parallel group (not compressed)"
                     + ("; 1-bit Adam steps them with plain AdamW" if c.method == "onebit" else ""))
    return lines


def _map_tensors(obj, fn):
    """``obj`` (nested dicts, lists, tuples) with ``fn`` applied to every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _compressors(model_chunks) -> List[Optional[GradientCompressor]]:
    return [h if isinstance(h, GradientCompressor) else None for h in
            (getattr(m, "comm_hook", None) for m in model_chunks)]


def compression_state(model_chunks) -> Optional[list]:
    """Per model chunk, its compressor's state (None: no compressor); None when no chunk has one."""
    comps = _compressors(model_chunks)
    return [c.state_dict() if c is not None else None for c in comps] if any(comps) else None


def load_compression_state(model_chunks, saved: Optional[Sequence], skipped: Optional[str] = None) -> Optional[str]:
    """Restore what ``compression_state`` saved (None: not saved, or saved without a layout match; ``skipped``: the
    flag that left it unread). Returns what happened, for the log, or None when no chunk compresses."""
    comps = _compressors(model_chunks)
    if not any(comps):
        return None
    ok = saved is not None and len(saved) == len(comps) and all(
        (c is None) == (sd is None) for c, sd in zip(comps, saved))
    ok = ok and all(c.load_state_dict(sd) for c, sd in zip(comps, saved) if c is not None)
    if ok:
        return "gradient compression state restored"
    for c in comps:  # a partial restore must not mix with fresh state
        if c is not None:
            c.reset_state()
    if skipped:
        return f"gradient compression state starts afresh ({skipped})"
    return f"gradient compression state starts afresh ({_why_not_restored(comps, saved)})"


_SIGNATURE_FLAGS = {"method": "--gradient-compression", "rank": "--gradient-compression-rank",
                    "topk_ratio": "--topk-ratio", "world": "data-parallel size"}


def _why_not_restored(comps, saved) -> str:
    """The first difference between the saved compressor signatures and this run's, in the user's words (the
    state is per dp rank: under another dp size its error memories belong to no rank here)."""
    if saved is None:
        return "the checkpoint has none: saved without compression or with --no-save-compression-state"
    if len(saved) != len(comps) or any((c is None) != (sd is None) for c, sd in zip(comps, saved)):
        return f"saved for {len(saved)} model chunks, this run has {len(comps)}"
    for c, sd in zip(comps, saved):
        if c is None:
            continue
        old, new = sd.get("signature", {}), c.signature()
        for key, name in _SIGNATURE_FLAGS.items():
            if old.get(key) != new.get(key):
                return f"saved at {name} {old.get(key)}, this run has {new.get(key)}"
        if old != new:
            return "saved under another bucket layout (--bucket-size, model shape or parallel layout)"
    return "the checkpoint has none for this layout and these compression flags"


def compression_report(model_chunks, reset: bool = True) -> Optional[dict]:
    """This rank's gradient bytes per step since the last report, and the ratio to plain DDP (None: no hooks)."""
    reps = [r for r in (c.stats.report(reset) for c in _compressors(model_chunks) if c is not None) if r]
    if not reps:
        return None
    sent = sum(r["bytes_per_step"] for r in reps)
    base = sum(r["baseline_bytes_per_step"] for r in reps)
    return {"bytes_per_step": sent, "baseline_bytes_per_step": base,
            "compression_ratio": base / sent if sent else float("inf")}


def format_compression_report(rep: Optional[dict]) -> str:
    """The log-line fragment: 'grad comm MB/step: X | compression ratio: Yx |' (empty without compression)."""
    if not rep:
        return ""
    mb, ratio = rep["bytes_per_step"] / 1e6, rep["compression_ratio"]
    return f"grad comm MB/step: {mb:.4f} | compression ratio: {ratio:.1f}x |"
