#!/usr/bin/env python
"""Measured vs estimated peak memory of real training steps, one JSON line per configuration.

Each configuration is a list of ``pretrain_llama.py`` flags. The steps are the training loop's own pieces
(``setup_model_and_optimizer``: our DDP/ZeRO wrapper and AdamW; ``make_forward_step``: autocast + fused head;
the pipeline schedule; ``finalize_model_grads``; ``optimizer.step``) on random tokens, so what is measured is
what ``pretrain`` allocates. On CUDA the peak is ``torch.cuda.max_memory_allocated`` (split into forward/backward
and optimizer-step peaks, and the model states left between steps); on CPU a dispatch-mode tracker
(``megallama.memory_tracker.LiveBytes``) counts the same bytes, which is how the tests run this script.

  python benchmarks/measure_memory.py --preset validation --out mem.jsonl          # one GPU
  python benchmarks/measure_memory.py --preset features --out mem.jsonl            # fp8, MoE shared/padded experts
  python benchmarks/measure_memory.py --preset recompute-modules --out mem.jsonl   # --recompute-modules
  torchrun --nproc_per_node 2 benchmarks/measure_memory.py --preset two-gpu       # ZeRO-0/1 with dp 2, tp 2 + SP
  python benchmarks/measure_memory.py --config "--model tiny_llama3_150m --micro-batch-size 4 --seq-length 2048 --bf16"

Fields: measured.peak_allocated (the max over ranks; per rank in peak_allocated_per_rank), estimate.peak_allocated
(bytes, the busiest rank's; without the context/NCCL/fragmentation overhead, which max_memory_allocated does not
see), rel_err = estimate / measured - 1.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

_1B = ["--model", "llama3_2_1b"]
_150M = ["--model", "tiny_llama3_150m"]
PRESETS = {
    "features": [  # one GPU: fp8 linears (against the same run in bf16), MoE with a shared expert padded to capacity
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--fp8-format", "hybrid"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048"],
        _150M + ["--micro-batch-size", "4", "--seq-length", "2048", "--num-experts", "8",
                 "--moe-shared-expert-intermediate-size", "1024", "--moe-expert-capacity-factor", "1.25",
                 "--moe-pad-expert-input-to-capacity"],
    ],
    "recompute-modules": [  # one GPU: Megatron's --recompute-modules, dense and MoE with a gated shared expert
        _1B + ["--micro-batch-size", "4", "--seq-length", "2048", "--recompute-granularity", "selective",
               "--recompute-modules", "core_attn"],
        _1B + ["--micro-batch-size", "4", "--seq-length", "2048", "--recompute-granularity", "selective",
               "--recompute-modules", "layernorm", "mlp"],
        _150M + ["--micro-batch-size", "4", "--seq-length", "2048", "--num-experts", "8",
                 "--moe-shared-expert-intermediate-size", "1024", "--moe-shared-expert-gate",
                 "--recompute-granularity", "selective", "--recompute-modules", "moe_act", "shared_experts",
                 "layernorm"],
        _150M + ["--micro-batch-size", "4", "--seq-length", "2048", "--num-experts", "8",
                 "--recompute-granularity", "selective", "--recompute-modules", "moe"],
    ],
    "validation": [  # one GPU: two models, two batch sizes, recompute none / selective / full, ZeRO-0 and 1
        _150M + ["--micro-batch-size", "2", "--seq-length", "2048"],
        _150M + ["--micro-batch-size", "8", "--seq-length", "2048"],
        _150M + ["--micro-batch-size", "8", "--seq-length", "2048", "--recompute-granularity", "full"],
        _150M + ["--micro-batch-size", "8", "--seq-length", "2048", "--zero-stage", "1"],
        _1B + ["--micro-batch-size", "1", "--seq-length", "2048"],
        _1B + ["--micro-batch-size", "4", "--seq-length", "2048"],
        _1B + ["--micro-batch-size", "4", "--seq-length", "2048", "--recompute-granularity", "selective"],
        _1B + ["--micro-batch-size", "4", "--seq-length", "2048", "--recompute-granularity", "full"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "4096", "--recompute-granularity", "full"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--global-batch-size", "8"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--no-fused-kernels"],
    ],
    "two-gpu": [  # torchrun --nproc_per_node 2
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--zero-stage", "0"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--zero-stage", "1"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--zero-stage", "2"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--tensor-model-parallel-size", "2",
               "--sequence-parallel"],
        _1B + ["--micro-batch-size", "2", "--seq-length", "2048", "--pipeline-model-parallel-size", "2",
               "--global-batch-size", "8"],
    ],
}


class _Meter:
    """max_memory_allocated on CUDA; the live-bytes tracker on CPU (entered before the model exists)."""

    def __init__(self, device):
        self.device, self.live = device, None
        if device.type == "cpu":
            from megallama.memory_tracker import LiveBytes
            self.live = LiveBytes()
            self.live.__enter__()

    def reset(self):
        if self.live is not None:
            self.live.reset_peak()
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.live is not None:
            return self.live.peak
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def current(self) -> int:
        if self.live is not None:
            return self.live.current
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reserved(self):
        return None if self.live is not None else torch.cuda.max_memory_reserved(self.device)

    def close(self):
        if self.live is not None:
            self.live.__exit__(None, None, None)


def _batches(args, device):
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.micro_batch_size, args.seq_length)
    while True:
        ids = torch.randint(0, args.model_config.vocab_size, shape, generator=g)
        yield {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(shape)}


def estimate_for(args, device, world: int, fused=None) -> dict:
    """The estimator's numbers for parsed ``args``; ``fused`` (kernels in use) is probed on ``device`` if None."""
    from megallama.memory import WORKSPACE_BYTES, estimate_requirements
    from megallama.ops import _extension
    if fused is None:
        fused = not args.no_fused_kernels and _extension.use_fused(torch.empty(1, device=device))
    # the parsed split (megatron_flags.derive_pipeline): uneven layouts and account-for flags included
    v = (getattr(args, "virtual_pipeline_model_parallel_size", None) or 1) \
        if args.pipeline_schedule == "interleaved" else 1
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    params_dtype = getattr(args, "params_dtype", "fp32")
    mode = "autocast" if params_dtype == "fp32" or (params_dtype == "auto" and precision == "fp32") else "params"
    from megallama.memory_args import feature_kw  # strategy as built (--num-experts alone: moe), MoE options, fp8
    est = estimate_requirements(
        args.model, model_config=args.model_config, batch_size=args.micro_batch_size,
        sequence_length=args.seq_length, num_gpus=world, tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size, cp=args.context_parallel_size, ep=args.expert_model_parallel_size,
        zero_stage=args.zero_stage,
        recompute=args.recompute_granularity or "none",
        precision=precision, mixed_precision_mode=mode, num_experts=args.num_experts,
        sequence_parallel=args.sequence_parallel,
        pipeline_schedule=args.pipeline_schedule, virtual_pipeline_stages=v,
        num_microbatches=args.num_microbatches, fused_kernels=fused, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, recompute_modules=getattr(args, "recompute_modules", None),
        microbatch_group_size=getattr(args, "microbatch_group_size_per_vp_stage", None),
        pipeline_layer_counts=getattr(args, "pipeline_layer_counts", None), bucket_size=args.bucket_size,
        overlap_grad_reduce=args.overlap_grad_reduce, optimizer="fused" if device.type == "cuda" else "foreach",
        device=device.type, recommend=False, **feature_kw(args))
    b = est["breakdown_bytes"]
    alloc = sum(v for k, v in b.items() if k != "overhead") - (WORKSPACE_BYTES if device.type == "cpu" else 0)
    return {"peak_allocated": alloc, "model_states": b["weights"] + b["grads"] + b["optimizer"],
            "memory_per_gpu_gb": est["memory_per_gpu_gb"], "phase": est["peak_phase"],
            "worst_stage": est["worst_stage"], "fused_kernels": fused, "breakdown_bytes": b}


def measure(argv, steps: int = 3, device: str = None) -> dict:
    """Run ``steps`` training iterations of one configuration; return measured and estimated memory."""
    from megallama.arguments import parse_args
    from megallama.initialize import initialize_megatron
    from megallama.mpu import parallel_state as ps
    from megallama.ops import _extension
    from megallama.training import make_forward_step
    from megallama.finalize_model_grads import finalize_model_grads
    from megallama.training_setup import get_forward_backward, setup_model_and_optimizer
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    extra = ["--mock-data", "--train-iters", str(steps)] + (["--device", device] if device else [])
    if "--fp16" not in argv and "--bf16" not in argv and "--mixed-precision" not in argv:
        extra.append("--bf16")
    args = parse_args(list(argv) + extra, world_size=world)
    _extension.set_fused_kernels(not args.no_fused_kernels)
    try:  # routing statistics are process-global; a previous configuration's expert count must not leak in
        from megallama.model.moe_stats import get_moe_stats
        get_moe_stats().reset()
    except ImportError:
        pass
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    dev = initialize_megatron(args)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    meter = _Meter(dev)
    try:
        meter.reset()
        chunks, optimizer = setup_model_and_optimizer(args, dev)
        after_build = meter.current()
        data = _batches(args, dev)
        fb, fstep = get_forward_backward(args), make_forward_step(args, dev)
        rows = []
        t0 = time.time()
        for _ in range(steps):
            optimizer.zero_grad()
            meter.reset()
            fb(fstep, data, chunks, args.num_microbatches, args.seq_length, args.micro_batch_size,
               forward_only=False, grad_scale_func=optimizer.scale_loss if args.fp16 else None)
            finalize_model_grads(chunks, args)
            peak_fb = meter.peak()
            meter.reset()
            optimizer.step()
            rows.append({"peak_fwd_bwd": peak_fb, "peak_optimizer_step": meter.peak(),
                         "between_steps": meter.current()})
        last = rows[-1]
        measured = {"peak_allocated": max(last["peak_fwd_bwd"], last["peak_optimizer_step"]),
                    "peak_fwd_bwd": last["peak_fwd_bwd"], "peak_optimizer_step": last["peak_optimizer_step"],
                    "model_states_allocated": last["between_steps"], "after_build": after_build,
                    "max_reserved": meter.reserved(), "per_step": rows,
                    "seconds_per_step": (time.time() - t0) / steps}
        try:
            measured["footprint"] = {"ddp": [m.memory_footprint() for m in chunks],
                                     "optimizer": optimizer.memory_footprint()}
        except Exception:  # noqa: BLE001 - accounting helpers are optional
            pass
    finally:
        meter.close()
    if dist.is_initialized() and dist.get_world_size() > 1:  # the estimate is the busiest rank's: compare to the max
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, measured["peak_allocated"])
        measured["peak_allocated_per_rank"] = peaks
        measured["peak_allocated_this_rank"] = measured["peak_allocated"]
        measured["peak_allocated"] = max(peaks)
    est = estimate_for(args, dev, world)
    out = {"argv": list(argv), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "world_size": world, "rank": dist.get_rank() if dist.is_initialized() else 0,
           "measured": measured, "estimate": est,
           "rel_err": est["peak_allocated"] / measured["peak_allocated"] - 1}
    del chunks, optimizer
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--config", action="append", default=[], help="pretrain_llama.py flags of one configuration")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="append the JSON lines here as well")
    a = p.parse_args(argv)
    configs = (PRESETS[a.preset] if a.preset else []) + [shlex.split(c) for c in a.config]
    if not configs:
        p.error("give --preset or --config")
    failures = 0
    for cfg in configs:
        try:
            rec = measure(cfg, a.steps, a.device)
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            rec = {"argv": cfg, "error": f"{type(e).__name__}: {e}"}
            failures += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            line = json.dumps(rec, default=str)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
