#!/usr/bin/env python
"""Throughput and memory of real training steps, with HF baselines measured in the same command.

    python tools/benchmark.py --model llama3_2_1b --batch-sizes 8 --seq-length 2048 --bf16 --compare-hf

Each configuration runs in its own process (clean memory stats, no cross-talk from compile caches); megallama runs
``pretrain`` on mock data, HF runs ``LlamaForCausalLM`` (+ torch.compile, + Liger with ``--liger``). Reports tok/s,
tok/s/GPU, MFU against the card's dense peak and against a bf16 8192^3 matmul measured at start, peak memory, and
ratios to the HF+compile baseline. ``--megallama-args`` passes extra flags (e.g. "--compile --zero-stage 1").

On CPU (no CUDA needed): ``--megallama-args "--device cpu"`` times the same steps on the CPU; the table reports
tok/s per CPU process, with no MFU and no HF baseline.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megallama.arg_parser import OneLineErrorParser  # noqa: E402


def measured_matmul_tflops(n=8192, iters=20) -> float:
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def _run(cmd, log=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if log:  # the workers' own output (e.g. the --profile-step table), appended for later reading
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n{r.stdout}\n{r.stderr}\n")
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (r.stderr or r.stdout)[-3000:]
    return {"error": tail}


def _device(flags: str) -> str:
    """The device a --megallama-args variant trains on: its --device, else cuda (pretrain's default with a GPU)."""
    words = shlex.split(flags)
    for i, w in enumerate(words):
        if w.startswith("--device="):
            return w.split("=", 1)[1]
        if w == "--device" and i + 1 < len(words):
            return words[i + 1]
    return "cuda"


def main(argv=None):
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny_llama3_150m", help="a named model (megallama.config.list_models())")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gpus", type=int, default=1, help="megallama runs under torchrun with this many processes")
    p.add_argument("--bf16", action="store_true", default=True)
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--liger", action="store_true", help="also HF + Liger kernels (needs liger-kernel)")
    p.add_argument("--megallama-args", action="append", default=None,
                   help="extra flags for pretrain, quoted; repeat to benchmark several variants in one run; "
                   "\"--device cpu\" runs on the CPU (no CUDA needed; tok/s per CPU process, no MFU)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--save-results", default=None)
    p.add_argument("--worker-log", default=None, help="append every worker's stdout/stderr to this file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of tok/s here (needs matplotlib)")
    a = p.parse_args(argv)
    from megallama.cli import check_results_path
    from megallama.config import get_model_config
    from megallama.errors import ConfigError
    try:  # before any measurement (and before the device): not a traceback after the whole benchmark
        cfg = get_model_config(a.model)
        check_results_path(a.save_results)
        check_results_path(a.plot, "--plot")
        devices = {_device(v) for v in (a.megallama_args or [""])}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    from megallama.logging import device_peak_flops, flops_per_token
    gpu = devices != {"cpu"}
    if gpu and not torch.cuda.is_available():
        print("error: tools/benchmark.py measures GPU training and no CUDA device is visible; to time the steps on "
              "the CPU pass --megallama-args \"--device cpu\"", file=sys.stderr)
        return 2
    if not gpu and (a.compare_hf or a.liger):
        print("error: the HF baselines (--compare-hf, --liger) run on CUDA only; drop them with --device cpu",
              file=sys.stderr)
        return 2
    peak = (a.peak_tflops * 1e12 if a.peak_tflops else device_peak_flops(torch.device("cuda"))) if gpu else None
    mm = measured_matmul_tflops() * 1e12 if gpu else None
    fpt = flops_per_token(cfg, a.seq_length)
    card = torch.cuda.get_device_name() if gpu else "CPU"
    unit = "GPU" if devices == {"cuda"} else "CPU" if not gpu else "device"  # the column says what it divides by
    print(f"# {card}: " + (f"bf16 8192^3 matmul {mm / 1e12:.0f} TFLOP/s; dense peak "
                           f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; " if gpu else "")
          + f"{a.model}: {cfg.num_params() / 1e6:.1f}M params, {fpt / 1e9:.2f} GFLOP/token at seq {a.seq_length}")
    rows = []
    for mbs in a.batch_sizes:
        common = ["--model", a.model, "--seq-length", str(a.seq_length), "--micro-batch-size", str(mbs),
                  "--global-batch-size", str(mbs * a.gpus), "--train-iters", str(a.steps + 5)]
        common += ["--bf16"] if gpu else []  # CPU: pretrain's own precision
        if a.gpus > 1:
            cmd = ["torchrun", "--nproc_per_node", str(a.gpus), "benchmarks/megallama_step.py"]
        else:
            cmd = [sys.executable, "benchmarks/megallama_step.py"]
        res = [dict(_run(cmd + common + shlex.split(v), a.worker_log), impl="megallama" + (f" [{v}]" if v else ""),
                    device=_device(v)) for v in (a.megallama_args or [""])]
        other = [r["impl"] for r in res if abs(r.get("flops_per_token", fpt) - fpt) > 1e-9 * fpt]
        if a.compare_hf and other:  # the HF baseline is --model's shape; its ratio would compare two models
            print(f"error: {other[0]} trains another shape than --model {a.model} (--megallama-args change it), "
                  f"and the HF baselines are built from --model; drop --compare-hf/--liger or the shape flags",
                  file=sys.stderr)
            return 2
        if a.compare_hf:
            hf = [sys.executable, "benchmarks/hf_step.py", "--config-json", json.dumps(cfg.to_dict()),
                  "--micro-batch-size", str(mbs), "--seq-length", str(a.seq_length), "--steps", str(a.steps)]
            res.append(dict(_run(hf + ["--mode", "compile"], a.worker_log), impl="hf+compile"))
            if a.liger:
                res.append(dict(_run(hf + ["--mode", "liger"], a.worker_log), impl="hf+liger"))
        base = next((r for r in res if r["impl"] == "hf+compile" and "error" not in r), None)
        for r in res:
            r["micro_batch_size"] = mbs
            if "error" in r:
                rows.append(r)
                continue
            tps = r["tokens_per_s"] / (a.gpus if r["impl"].startswith("megallama") else 1)
            r["tokens_per_s_per_gpu"] = tps
            on_gpu = r.setdefault("device", "cuda") != "cpu"
            flops = r.get("flops_per_token", fpt)  # the model the worker ran (--megallama-args may reshape it)
            r["mfu_vs_peak"] = tps * flops / peak if peak and on_gpu else None
            r["mfu_vs_matmul"] = tps * flops / mm if mm and on_gpu else None
            if base and on_gpu:
                r["speedup_vs_hf_compile"] = tps / base["tokens_per_s"]
                r["memory_vs_hf_compile"] = r["peak_mem_gib"] / base["peak_mem_gib"]
            rows.append(r)
    print(f"| impl | mbs | tok/s/{unit} | MFU (989) | MFU (matmul) | peak GiB | x HF+compile | mem / HF+compile |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['micro_batch_size']} | failed: {r['error'].strip().splitlines()[-1][:120]} |")
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        print(f"| {r['impl']} | {r['micro_batch_size']} | {r['tokens_per_s_per_gpu']:.0f} | {f('mfu_vs_peak', '{:.1%}')} "
              f"| {f('mfu_vs_matmul', '{:.1%}')} | {f('peak_mem_gib', '{:.1f}')} "
              f"| {f('speedup_vs_hf_compile', '{:.3f}')} | {f('memory_vs_hf_compile', '{:.3f}')} |")
    if a.save_results:
        with open(a.save_results, "w") as fh:
            json.dump({"card": card, "matmul_tflops": mm / 1e12 if mm else None, "model": a.model, "rows": rows}, fh,
                      indent=1)
    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            ok = [r for r in rows if "error" not in r]
            plt.bar([f"{r['impl']}\nmbs {r['micro_batch_size']}" for r in ok], [r["tokens_per_s_per_gpu"] for r in ok])
            plt.ylabel(f"tokens/s/{unit}")
            plt.title(f"{a.model} on {card}")
            plt.tight_layout()
            plt.savefig(a.plot)
        except ImportError:
            print("note: matplotlib not installed; no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
