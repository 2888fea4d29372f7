"""Effective bandwidth of the fused RMSNorm / SwiGLU / RoPE kernels against their peers, in one run on one GPU.

GB/s = minimal bytes moved / median time, per element of the main tensor (bf16): RMSNorm fwd 4 B (read x, write
y), fwd+bwd 10 (+ read dy, x, write dx); SwiGLU fwd 6 (read gate, up, write y), fwd+bwd 16 (+ read dy, gate, up,
write dgate, dup); RoPE fwd 4, fwd+bwd 8. Peers: eager PyTorch (the reference ops), F.rms_norm, torch.compile of
the reference, Liger (when importable). Each implementation's output is checked against eager before timing.
Timing: triton.testing.do_bench (CUDA events, warm-up, median) when Triton is importable, else CUDA events.

    python benchmarks/bench_kernels.py [--quick] [--json out.json] [--variants]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.ops import _extension, apply_rope, apply_rope_qk, swiglu  # noqa: E402
from megallama.ops.rms_norm import rms_norm_fused, rms_norm_reference  # noqa: E402
from megallama.ops.rope import apply_rope_reference, rope_cos_sin, rope_frequencies  # noqa: E402
from megallama.ops.swiglu import swiglu_reference  # noqa: E402

try:
    from triton.testing import do_bench as _do_bench
except Exception:  # noqa: BLE001
    _do_bench = None


def bench_ms(fn, warmup_ms=100, rep_ms=400) -> float:
    if _do_bench is not None:
        return float(_do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _liger():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from importlib.metadata import version
        return LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction, version("liger-kernel")
    except Exception:  # noqa: BLE001
        return None


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fwd_bwd(f, inputs, grads_of, dys):
    """A closure running forward and backward; grads come back from autograd.grad (no accumulation traffic)."""
    def run():
        out = f(*inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.grad(outs, grads_of, dys)
    return run


def measure(name, impls, inputs, grads_of, dy_fn, fwd_bytes, fb_bytes, rows, ref_fn=None):
    """impls: {label: callable(*inputs) -> tensor or tuple}, checked against ref_fn (default: impls["eager"])."""
    with torch.no_grad():
        ref = (ref_fn or impls["eager"])(*inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    dys = dy_fn(ref)
    for label, f in impls.items():
        try:
            with torch.no_grad():
                out = f(*[t.detach() for t in inputs])
            out = out if isinstance(out, (tuple, list)) else (out,)
            err = max(rel_err(o, r) for o, r in zip(out, ref))
            t_f = bench_ms(lambda: f(*inputs))
            t_fb = bench_ms(fwd_bwd(f, inputs, grads_of, dys))
            row = dict(op=name, impl=label, fwd_ms=t_f, fwd_gbs=fwd_bytes / t_f / 1e6, fwdbwd_ms=t_fb,
                       fwdbwd_gbs=fb_bytes / t_fb / 1e6, rel_err_vs_eager=err)
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            row = dict(op=name, impl=label, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        _print_row(row)
    return rows


def _print_row(r):
    if "error" in r:
        print(f"{r['op']:8s} {r['impl']:28s} ERROR {r['error']}", flush=True)
    else:
        print(f"{r['op']:8s} {r['impl']:28s} fwd {r['fwd_ms']:8.3f} ms {r['fwd_gbs']:7.0f} GB/s | fwd+bwd "
              f"{r['fwdbwd_ms']:8.3f} ms {r['fwdbwd_gbs']:7.0f} GB/s | err {r['rel_err_vs_eager']:.1e}", flush=True)


def copy_ceiling(nbytes=2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6


def bench_rms(rows, n, h, liger, compiled, variants):
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(h, device="cuda")).to(torch.bfloat16).requires_grad_()
    eps = 1e-5
    impls = {"megallama": lambda a, b: rms_norm_fused(a, b, eps),
             "eager": lambda a, b: rms_norm_reference(a, b, eps),
             "F.rms_norm": lambda a, b: F.rms_norm(a, (h,), b, eps)}
    if compiled:
        impls["torch.compile(reference)"] = torch.compile(lambda a, b: rms_norm_reference(a, b, eps))
    if liger:
        impls["liger"] = lambda a, b: liger[0].apply(a, b, eps)
    elem = n * h
    measure(f"rmsnorm", impls, (x, w), (x, w), lambda r: (torch.randn_like(r[0]),), 4 * elem, 10 * elem, rows)
    if variants:
        for fwd_t, bwd_t in ((128, 256), (256, 256), (512, 512)):
            os.environ["MEGALLAMA_RMS_FWD_THREADS"], os.environ["MEGALLAMA_RMS_BWD_THREADS"] = str(fwd_t), str(bwd_t)
            measure("rmsnorm", {f"megallama fwd{fwd_t}/bwd{bwd_t}": impls["megallama"]}, (x, w), (x, w),
                    lambda r: (torch.randn_like(r[0]),), 4 * elem, 10 * elem, rows, ref_fn=impls["eager"])
        os.environ.pop("MEGALLAMA_RMS_FWD_THREADS"), os.environ.pop("MEGALLAMA_RMS_BWD_THREADS")


def bench_swiglu(rows, n, f, liger, compiled):
    g = torch.randn(n, f, device="cuda", dtype=torch.bfloat16).requires_grad_()
    u = torch.randn(n, f, device="cuda", dtype=torch.bfloat16).requires_grad_()
    impls = {"megallama": swiglu, "eager": swiglu_reference}
    if compiled:
        impls["torch.compile(reference)"] = torch.compile(swiglu_reference)
    if liger:
        impls["liger"] = lambda a, b: liger[2].apply(a, b)
    elem = n * f
    measure("swiglu", impls, (g, u), (g, u), lambda r: (torch.randn_like(r[0]),), 6 * elem, 16 * elem, rows)


def bench_rope(rows, b, s, hq, hk, d, liger, compiled):
    """q and k of one attention layer ([b, s, heads, d] as the model holds them), rotated by one table."""
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    cos, sin = rope_cos_sin(rope_frequencies(d, 5e5, device="cuda"), torch.arange(s, device="cuda"))
    impls = {"megallama apply_rope_qk": lambda a, c: apply_rope_qk(a, c, cos, sin),
             "megallama apply_rope x2": lambda a, c: (apply_rope(a, cos, sin), apply_rope(c, cos, sin)),
             "eager": lambda a, c: (apply_rope_reference(a, cos, sin), apply_rope_reference(c, cos, sin))}
    if compiled:
        impls["torch.compile(reference)"] = torch.compile(
            lambda a, c: (apply_rope_reference(a, cos, sin), apply_rope_reference(c, cos, sin)))
    if liger:
        cos_full, sin_full = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]  # HF [1, s, d] tables

        def lig(a, c):  # Liger rotates the [b, h, s, d] views in place (so it runs last: it changes q and k)
            qo, ko = liger[1].apply(a.transpose(1, 2), c.transpose(1, 2), cos_full, sin_full)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        impls["liger (in place)"] = lig
    elem = q.numel() + k.numel()
    measure("rope", impls, (q, k), (q, k), lambda r: tuple(torch.randn_like(t) for t in r), 4 * elem, 8 * elem, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--json", help="write the result rows here")
    ap.add_argument("--variants", action="store_true", help="also time RMSNorm launch-shape variants")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--shapes", choices=["brief", "issue"], default="brief",
                    help="brief: RMSNorm 32768x4096, SwiGLU 32768x14336, RoPE q (16,2048,32,128)+k 8 heads; "
                         "issue: RMSNorm 16384x4096, SwiGLU 8192x14336, RoPE q (4,4096,32,128)+k 8 heads")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    assert _extension.load() and _extension._state["cuda"], "megallama CUDA kernels unavailable"
    torch.manual_seed(0)
    liger = _liger()
    dev = torch.cuda.get_device_name()
    ceiling = copy_ceiling()
    print(f"# {time.strftime('%Y-%m-%d')} {dev}, torch {torch.__version__}, kernels from {_extension.kernel_source()}, "
          f"liger {liger[3] if liger else 'not importable'}; device-to-device copy {ceiling:.0f} GB/s", flush=True)
    rows = []
    if args.quick:
        shapes = dict(rms=(1024, 4096), swiglu=(1024, 14336), rope=(2, 512, 32, 8, 128))
    elif args.shapes == "issue":
        shapes = dict(rms=(16384, 4096), swiglu=(8192, 14336), rope=(4, 4096, 32, 8, 128))
    else:
        shapes = dict(rms=(16 * 2048, 4096), swiglu=(16 * 2048, 14336), rope=(16, 2048, 32, 8, 128))
    compiled = not args.no_compile
    bench_rms(rows, *shapes["rms"], liger, compiled, args.variants)
    bench_swiglu(rows, *shapes["swiglu"], liger, compiled)
    bench_rope(rows, *shapes["rope"], liger, compiled)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, torch=torch.__version__, copy_gbs=ceiling, shapes=shapes, rows=rows), fh,
                      indent=1)


if __name__ == "__main__":
    main()
