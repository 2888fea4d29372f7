"""CPU time of the fused RMSNorm / SwiGLU / RoPE kernels against their PyTorch references (fwd+bwd, fp32).

The shapes are the README's tiny run (micro-batch 16 x sequence 128, hidden 256, FFN 1792, 4 heads of 64), where
the CPU kernels actually run. Each fused result is checked against the reference before timing; the median of
``--repeats`` calls is reported, at each thread count.

    python benchmarks/bench_kernels_cpu.py                                   # this machine's default build
    MEGALLAMA_CPU_ARCH=x86-64 TORCH_EXTENSIONS_DIR=/tmp/sse2 python benchmarks/bench_kernels_cpu.py  # SSE2 build
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.ops import _extension, apply_rope, swiglu  # noqa: E402
from megallama.ops.rms_norm import rms_norm_fused, rms_norm_reference  # noqa: E402
from megallama.ops.rope import apply_rope_reference, rope_cos_sin, rope_frequencies  # noqa: E402
from megallama.ops.swiglu import swiglu_reference  # noqa: E402


def cases(b=16, s=128, h=256, f=1792, heads=4, d=64):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(b, s, h, generator=g), torch.rand(h, generator=g) + 0.5
    gate, up = torch.randn(b, s, f, generator=g), torch.randn(b, s, f, generator=g)
    q = torch.randn(b, s, heads, d, generator=g)
    cos, sin = rope_cos_sin(rope_frequencies(d, 500000.0), torch.arange(s))
    return [
        ("rms_norm", lambda a, w_: rms_norm_fused(a, w_, 1e-5), lambda a, w_: rms_norm_reference(a, w_, 1e-5), (x, w)),
        ("swiglu", swiglu, swiglu_reference, (gate, up)),
        ("rope", lambda a: apply_rope(a, cos, sin), lambda a: apply_rope_reference(a, cos, sin), (q,)),
    ]


def fwd_bwd_ms(fn, inputs, repeats):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    dy = torch.randn_like(fn(*leaves))
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        fn(*leaves).backward(dy)
        if i >= 3:  # warm-up: allocator, first-call dispatch
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def check(fused, ref, inputs):
    a = [t.clone().requires_grad_(True) for t in inputs]
    b = [t.clone().requires_grad_(True) for t in inputs]
    ya, yb = fused(*a), ref(*b)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    for u, v in [(ya, yb)] + [(p.grad, r.grad) for p, r in zip(a, b)]:
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    if not _extension.load():
        sys.exit("error: the C++ kernels did not build; see the warning above")
    print(f"kernels: {_extension.kernel_source()}  (MEGALLAMA_CPU_ARCH={os.environ.get('MEGALLAMA_CPU_ARCH', 'native')})")
    print(f"| op | threads | fused fwd+bwd ms | reference ms | reference / fused |")
    print(f"|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, fused, ref, inputs in cases():
            check(fused, ref, inputs)
            tf, tr = fwd_bwd_ms(fused, inputs, args.repeats), fwd_bwd_ms(ref, inputs, args.repeats)
            print(f"| {name} | {threads} | {tf:.2f} | {tr:.2f} | {tr / tf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
