"""Throughput and memory of ZeRO stages 0-3 on the same model: tok/s and peak memory per GPU, one line per stage.

    torchrun --nproc_per_node 2 -m megallama.optimizer.benchmark --model llama3_2_1b --seq-length 2048 \
        --micro-batch-size 2 --num-microbatches 2 --steps 10 --stages 0,1,2,3

bf16 parameters with fp32 masters (p = 2, g = 4, K = 12), overlapped grad reduction and param gather. Every stage
starts from the same weights and data, so the first losses must agree across stages (printed). On CPU it runs with
gloo (``--device cpu``) as a smoke test.
"""
from __future__ import annotations

import gc
import json
import os
import time

import torch
import torch.distributed as dist

from megallama.arg_parser import OneLineErrorParser
from megallama.config import get_model_config
from megallama.model import build_model
from megallama.mpu import parallel_state as ps
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3_2_1b")
    p.add_argument("--num-layers", type=int, default=None, help="override the model's layer count")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--bucket-size", type=int, default=40_000_000)
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--params-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def run_stage(args, cfg, stage, device, dtype):
    model = build_model(cfg, device=device, dtype=dtype, seed=1234)
    ddp = DistributedDataParallel(model, zero_stage=stage, bucket_size=args.bucket_size,
                                  overlap_grad_reduce=not args.no_overlap, overlap_param_gather=not args.no_overlap)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0,
                                                 bf16=dtype == torch.bfloat16, params_dtype=dtype), [ddp])
    dp, rank = ddp.dp_size, ddp.dp_rank
    gen = torch.Generator().manual_seed(4321)
    mbs, m, s = args.micro_batch_size, args.num_microbatches, args.seq_length
    data = torch.randint(0, cfg.vocab_size, (args.warmup + args.steps, dp, m, mbs, s + 1), generator=gen)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for i in range(m):
            batch = data[it, rank, i].to(device)
            ctx = ddp.no_sync() if i < m - 1 else _null()
            with ctx:
                loss = ddp(batch[:, :-1], labels=batch[:, 1:]).float().mean()
                (loss / m).backward()
            total += loss.detach() / m
        ddp.finish_grad_sync()
        ok, norm, _ = opt.step()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(float(total) / dp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    step = sum(times[args.warmup:]) / args.steps
    tokens = dp * m * mbs * s
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    held = ddp.memory_footprint()
    held.update(opt.memory_footprint())
    res = {"stage": stage, "step_ms": step * 1e3, "tok_s": tokens / step, "tok_s_per_gpu": tokens / step / dp,
           "peak_gib": peak, "held_gib": {k: v / 2**30 for k, v in held.items() if k != "padding_elements"},
           "first_losses": losses[:3], "grad_norm": norm}
    del ddp, opt, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _max_over_ranks(x, device):
    if x is None or not dist.is_initialized():
        return x
    t = torch.tensor([x], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ps.initialize_model_parallel()
    cfg = get_model_config(args.model)
    if args.num_layers:
        cfg = cfg.replace(num_layers=args.num_layers)
    dtype = torch.bfloat16 if args.params_dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for stage in [int(x) for x in args.stages.split(",")]:
        r = run_stage(args, cfg, stage, device, dtype)
        r["peak_gib"] = _max_over_ranks(r["peak_gib"], device)
        results.append(r)
        base = results[0]["tok_s"] if results[0]["stage"] == 0 else None
        if base:
            r["vs_ddp"] = r["tok_s"] / base
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(r), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
