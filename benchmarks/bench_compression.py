"""Gradient compression on GPUs: kernel throughput, and training step time against uncompressed DDP.

kernels (one GPU): effective GB/s = minimal bytes moved / median time, for n fp32 gradient entries:
  onebit_pack   read x, read + write the fp32 error, write n/8 bits   12n + n/8 bytes
  onebit_unpack read R x n/8 bits, write the fp32 result             4n + R n/8
  topk_pack     read x, read + write the error, write 8k               12n + 8k
  topk_unpack   write the dense fp32 result, read R x 8k               4n + 8Rk
each checked against the CPU kernel first, and timed next to its PyTorch reference on the same GPU (for top-k:
torch.topk of |x + e| plus the scatter, the usual way to do it).

step (torchrun, one GPU per rank, NCCL): a bf16 Llama (default ~0.9B parameters) under DDP (ZeRO 0 or 1), mock
tokens, median step time over --steps steps after warm-up, per method (--overlap-grad-reduce: buckets reduced, or
compressed on a side stream, during the backward); compression from the second step on (1-bit
without variance refreshes, so every timed step is a compressed one). Bytes/step per rank as the loop logs them.

    python benchmarks/bench_compression.py kernels [--sizes 16,64] [--json out.json]
    torchrun --nproc_per_node 2 benchmarks/bench_compression.py step [--zero-stage 1] [--overlap-grad-reduce] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.ops import _extension  # noqa: E402
from megallama.ops import compression as C  # noqa: E402

try:
    from triton.testing import do_bench as _do_bench
except Exception:  # noqa: BLE001
    _do_bench = None


def bench_ms(fn, setup=None) -> float:
    """Median ms of fn(); ``setup`` (untimed) restores inputs the op mutates (the error buffer)."""
    times = []
    for i in range(25):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        if i >= 5:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def _reference_topk(x, e, k):
    c = e.add_(x.float())
    idx = torch.topk(c.abs(), k, sorted=False).indices
    vals = c[idx]
    c[idx] = 0
    return vals, idx


def kernels(args) -> list:
    _extension.set_fused_kernels(True)
    assert _extension.load() and _extension._state["cuda"], "CUDA kernels unavailable"
    dev, rows, out = "cuda", args.ranks, []
    for m in [int(s) for s in args.sizes.split(",")]:
        n = m << 20
        k = max(1, int(args.topk_ratio * n))
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, device=dev).to(dtype)
            e0 = 0.01 * torch.randn(n, device=dev)
            e = e0.clone()
            # correctness against the CPU kernel on a slice first
            xs, es = x[:1 << 20], e0[:1 << 20]
            p1, s1 = C.onebit_pack(xs, es.clone(), args.chunk)
            p2, _ = C.onebit_pack(xs.cpu(), es.cpu(), args.chunk)
            assert torch.equal(p1.cpu(), p2), "onebit_pack differs from the CPU kernel"
            v1, i1 = C.topk_pack(xs, es.clone(), 1000)
            v2, i2 = C.topk_pack(xs.cpu(), es.cpu(), 1000)
            assert torch.equal(i1.cpu(), i2) and torch.equal(v1.cpu(), v2), "topk_pack differs from the CPU kernel"

            def reset():
                e.copy_(e0)
            packed, scales = C.onebit_pack(x, e, args.chunk)
            P, S = packed.expand(rows, -1).contiguous(), scales.expand(rows, -1).contiguous()
            vals, idx = C.topk_pack(x, e.copy_(e0), k)
            V, I = vals.expand(rows, -1).contiguous(), idx.expand(rows, -1).contiguous()
            es = x.element_size()
            cases = [
                ("onebit_pack", lambda: C.onebit_pack(x, e, args.chunk),
                 lambda: C.onebit_pack_reference(x, e, args.chunk), (es + 8) * n + n / 8),
                ("onebit_unpack", lambda: C.onebit_unpack(P, S, n, args.chunk, 1.0 / rows),
                 lambda: C.onebit_unpack_reference(P, S, n, args.chunk, 1.0 / rows), 4 * n + rows * n / 8),
                ("topk_pack", lambda: C.topk_pack(x, e, k), lambda: _reference_topk(x, e, k), (es + 8) * n + 8 * k),
                ("topk_unpack", lambda: C.topk_unpack(V, I, n, 1.0 / rows),
                 lambda: C.topk_unpack_reference(V, I, n, 1.0 / rows), 4 * n + 8 * rows * k),
            ]
            for name, fused, ref, nbytes in cases:
                t = bench_ms(fused, reset)
                t_ref = bench_ms(ref, reset)
                row = {"op": name, "n": n, "dtype": str(dtype).split(".")[-1], "k": k if "topk" in name else None,
                       "ms": t, "GB/s": nbytes / t / 1e6, "reference_ms": t_ref, "speedup": t_ref / t}
                out.append(row)
                print(f"{name:14s} n={m:4d}M {row['dtype']:8s} {t:8.3f} ms {row['GB/s']:8.1f} GB/s   "
                      f"reference {t_ref:8.3f} ms ({row['speedup']:.1f}x)", flush=True)
    return out


def step(args) -> list:
    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
    from megallama.optimizer.compression import (CompressionConfig, attach_gradient_compression,
                                                 compression_report, ddp_bytes_per_step)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = ModelConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.hidden // 128, num_query_groups=max(1, args.hidden // 512),
                      vocab_size=32000, max_position_embeddings=args.seq)
    runs = [("none", CompressionConfig()),
            (f"powersgd r{args.rank}", CompressionConfig("powersgd", rank=args.rank, warmup_steps=1)),
            ("onebit", CompressionConfig("onebit", warmup_steps=1, variance_refresh=False)),
            (f"topk {args.topk_ratio:g}", CompressionConfig("topk", topk_ratio=args.topk_ratio, warmup_steps=1))]
    results = []
    for name, ccfg in runs:
        model = build_model(cfg, device=dev, dtype=torch.bfloat16, seed=1)
        ddp = DistributedDataParallel(model, zero_stage=args.zero_stage, bucket_size=args.bucket_size,
                                      data_parallel_group=dist.group.WORLD,
                                      overlap_grad_reduce=args.overlap_grad_reduce)
        opt = get_megatron_optimizer(OptimizerConfig(lr=1e-4, bf16=True, params_dtype=torch.bfloat16), [ddp])
        attach_gradient_compression([ddp], opt, ccfg)
        ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=dev)
        times, rep = [], None
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = ddp(ids[:, :-1], labels=ids[:, 1:]).mean()
            loss.backward()
            ddp.finish_grad_sync()
            opt.step()
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            r = compression_report([ddp])
            rep = r if i >= args.warmup and r else rep
        ms = statistics.median(times)
        row = {"method": name, "world": world, "zero_stage": args.zero_stage, "ms_per_step": ms,
               "overlap_grad_reduce": args.overlap_grad_reduce,
               "params": sum(p.numel() for p in model.parameters()),
               "bytes_per_step": rep["bytes_per_step"] if rep else ddp_bytes_per_step(ddp),
               "compression_ratio": rep["compression_ratio"] if rep else 1.0}
        results.append(row)
        if rank == 0:
            print(f"{name:14s} {ms:9.1f} ms/step  ratio {row['compression_ratio']:6.1f}x  "
                  f"{row['bytes_per_step'] / 1e6:10.1f} MB/step/rank", flush=True)
        del ddp, opt, model
        torch.cuda.empty_cache()
    dist.destroy_process_group()
    return results if rank == 0 else []


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["kernels", "step"])
    p.add_argument("--sizes", default="16,64", help="kernels: millions of entries (2^20)")
    p.add_argument("--chunk", type=int, default=C.DEFAULT_CHUNK_SIZE)
    p.add_argument("--ranks", type=int, default=2, help="kernels: messages summed by the unpack ops")
    p.add_argument("--topk-ratio", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--bucket-size", type=int, default=40_000_000)
    p.add_argument("--overlap-grad-reduce", action="store_true",
                   help="step: reduce (compress) each bucket as soon as its gradients are ready, beside the backward")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = kernels(args) if args.mode == "kernels" else step(args)
    if args.json and rows:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "mode": args.mode, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
