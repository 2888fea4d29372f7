"""FP8 (``--fp8-format hybrid``, tensorwise current scaling, mpu/fp8_linear.py) against bf16 on one GPU, in one run:

1. the forward GEMM alone (``torch._scaled_mm`` on operands already in fp8, fast accumulation, vs ``torch.mm`` in
   bf16), then the tensor-parallel linears fwd+bwd as the decoder runs them (q/k/v and gate/up fused column layers,
   o/down row layers; fp8 includes the amaxes, casts and the three GEMMs) at Llama 3 8B and Llama 3.2 1B layer
   shapes, tokens = --tokens; bf16 weights, no ``main_grad`` (the same for both);
2. a training step of --step-model (default ``llama3_2_1b``; ``--step-model llama3_8b --step-layers 4`` for 8B
   shapes on one GPU) through ``pretrain`` (benchmarks/megallama_step.py, mock data), bf16 and fp8 (tensorwise and
   delayed recipes), eager and --compile: ms per step, tokens/s, the fp8/bf16 speed ratio and the loss after
   --steps steps.

    python benchmarks/bench_fp8.py [--tokens 8192] [--steps 20] [--seq 4096] [--mbs 2] [--skip-step | --skip-layers]
                                   [--json out]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_kernels import bench_ms  # noqa: E402
from megallama.config import get_model_config  # noqa: E402
from megallama.mpu.fp8 import E4M3, Fp8Recipe, amax, amax_to_scale, enable_fp8, quantize  # noqa: E402
from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, column_parallel_linears  # noqa: E402

SHAPE_MODELS = ("llama3_8b", "llama3_2_1b")
RECIPE = Fp8Recipe("hybrid")


def gemm_rows(tokens):
    """Forward GEMM [tokens, in] x [in, out]: bf16 torch.mm vs fp8 _scaled_mm, TFLOP/s."""
    rows = []
    for name in SHAPE_MODELS:
        c = get_model_config(name)
        h, f, q = c.hidden_size, c.ffn_hidden_size, c.num_attention_heads * c.head_dim
        for label, k, n in (("qkv", h, q + 2 * c.num_query_groups * c.head_dim), ("o", q, h), ("gate+up", h, 2 * f),
                            ("down", f, h)):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            sx, sw = amax_to_scale(amax(x), E4M3), amax_to_scale(amax(w), E4M3)
            x8, w8 = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
            ix, iw = sx.reciprocal(), sw.reciprocal()
            bf = bench_ms(lambda: torch.mm(x, w.t()))
            f8 = bench_ms(lambda: torch._scaled_mm(x8, w8.t(), ix, iw, out_dtype=torch.bfloat16, use_fast_accum=True))
            tf = 2 * tokens * k * n / 1e9
            rows.append(dict(model=name, gemm=label, shape=f"{tokens}x{k}x{n}", bf16_ms=bf, fp8_ms=f8,
                             bf16_tflops=tf / bf, fp8_tflops=tf / f8, speedup=bf / f8))
    return rows


def _layers(kind, k, outs, fp8):
    torch.manual_seed(0)
    make = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layers = [make(k, n, device="cuda", dtype=torch.bfloat16) for n in outs]
    for lin in layers:
        torch.nn.init.normal_(lin.weight, std=0.02)
    enable_fp8(torch.nn.ModuleList(layers), RECIPE if fp8 else None)
    return layers


def linear_rows(tokens):
    """Fused column / row layers fwd+bwd, bf16 vs fp8; err: fp8 output vs the bf16 layer's, relative norm."""
    rows = []
    for name in SHAPE_MODELS:
        c = get_model_config(name)
        h, f, d = c.hidden_size, c.ffn_hidden_size, c.head_dim
        kv = c.num_query_groups * d
        q = c.num_attention_heads * d
        for label, kind, k, outs in (("q/k/v", "column", h, (q, kv, kv)), ("o", "row", q, (h,)),
                                     ("gate/up", "column", h, (f, f)), ("down", "row", f, (h,))):
            x = torch.randn(1, tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            res = {}
            for mode in ("bf16", "fp8"):
                layers = _layers(kind, k, outs, mode == "fp8")

                def fwd():
                    return column_parallel_linears(x, layers) if kind == "column" else (layers[0](x),)
                ys = fwd()
                dys = [torch.randn_like(y) for y in ys]

                def step():
                    x.grad = None
                    for lin in layers:
                        lin.weight.grad = None
                    torch.autograd.backward(fwd(), dys)
                res[mode] = (bench_ms(step), ys[0].detach().float())
            err = float((res["fp8"][1] - res["bf16"][1]).norm() / res["bf16"][1].norm())
            flops = 6 * tokens * k * sum(outs) / 1e9
            rows.append(dict(model=name, layer=label, shape=f"{tokens}x{k}x{'+'.join(map(str, outs))}",
                             bf16_ms=res["bf16"][0], fp8_ms=res["fp8"][0], bf16_tflops=flops / res["bf16"][0],
                             fp8_tflops=flops / res["fp8"][0], speedup=res["bf16"][0] / res["fp8"][0], fp8_err=err))
    return rows


def step_rows(a):
    """--step-model training steps through pretrain, each configuration in its own process."""
    rows = []
    base = ["--model", a.step_model, "--bf16", "--device", "cuda", "--seq-length", str(a.seq), "--micro-batch-size",
            str(a.mbs), "--global-batch-size", str(a.mbs), "--train-iters", str(a.steps), "--seed", "1234"]
    base += ["--num-layers", str(a.step_layers)] if a.step_layers else []
    for compiled in (False, True):
        for fp8 in (None, "tensorwise", "delayed"):
            argv = base + (["--compile"] if compiled else []) + (["--fp8-format", "hybrid", "--fp8-recipe", fp8]
                                                                 if fp8 else [])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                            os.environ.get("PYTHONPATH")])))
            proc = subprocess.run([sys.executable, os.path.join(HERE, "megallama_step.py")] + argv,
                                  capture_output=True, text=True, env=env)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
            row = dict(mode="compile" if compiled else "eager", precision=f"fp8 hybrid {fp8}" if fp8 else "bf16")
            if proc.returncode or line is None:
                row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            else:
                row.update(json.loads(line))
            rows.append(row)
            print(f"  {row['mode']} {row['precision']}: " + (f"{row['step_time_s'] * 1e3:.1f} ms, loss "
                  f"{row['final_loss']:.4f}" if "error" not in row else f"failed: {row['error']}"), flush=True)
    return rows


def _print_speed_table(rows, key, label, err=False):
    """One markdown table of bf16 vs fp8 rows (the GEMM and layer tables)."""
    print(f"| model | {label} | MxKxN | bf16 ms | fp8 ms | bf16 TFLOP/s | fp8 TFLOP/s | fp8 speedup |"
          + (" fp8 out err |" if err else ""))
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if err else ""))
    for r in rows:
        print(f"| {r['model']} | {r[key]} | {r['shape']} | {r['bf16_ms']:.3f} | {r['fp8_ms']:.3f} | "
              f"{r['bf16_tflops']:.0f} | {r['fp8_tflops']:.0f} | {r['speedup']:.2f}x |"
              + (f" {r['fp8_err']:.1e} |" if err else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GEMM (micro-batch x sequence)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--skip-step", action="store_true", help="GEMM and layer tables only")
    p.add_argument("--skip-layers", action="store_true", help="the training step table only")
    p.add_argument("--step-model", default="llama3_2_1b")
    p.add_argument("--step-layers", type=int, default=None, help="fewer decoder layers (an 8B-shaped step on one GPU)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp8 = {RECIPE}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not a.skip_layers:
        print(f"\nforward GEMM alone, {a.tokens} tokens (fp8: operands already cast, fast accumulation)")
        out["gemm"] = gemm_rows(a.tokens)
        _print_speed_table(out["gemm"], "gemm", "GEMM")
        print(f"\nparallel linears fwd+bwd (tp 1), {a.tokens} tokens (fp8: amax + casts + 3 GEMMs)")
        out["linear"] = linear_rows(a.tokens)
        _print_speed_table(out["linear"], "layer", "layer", err=True)
    if not a.skip_step:
        layers = f" ({a.step_layers} layers)" if a.step_layers else ""
        print(f"\n{a.step_model}{layers} training step, micro-batch {a.mbs} x {a.seq}, {a.steps} steps (median of "
              "the steps after the third)")
        out["step"] = step_rows(a)
        print("| mode | precision | ms | tok/s | x bf16 | peak GiB | loss |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in out["step"]:
            if "error" in r:
                print(f"| {r['mode']} | {r['precision']} | failed: {r['error']} | | | | |")
                continue
            ref = next(b for b in out["step"] if b["mode"] == r["mode"] and b["precision"] == "bf16")
            ratio = ref["step_time_s"] / r["step_time_s"] if "step_time_s" in ref else float("nan")
            gib = r["peak_mem_gib"] or float("nan")
            print(f"| {r['mode']} | {r['precision']} | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{ratio:.2f}x | {gib:.1f} | {r['final_loss']:.4f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
