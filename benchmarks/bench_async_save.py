"""How long the training loop blocks at a checkpoint save: synchronous (the whole save) against --async-save (the
host snapshot only; the writing goes on in the background). Runs ``pretrain`` twice with the same flags, saving
every --save-interval iterations, and reports the median time the loop spent in each interval save (the last save,
which an async run publishes before returning, is left out) and the size of one checkpoint.

    python benchmarks/bench_async_save.py                       # the tiny CPU model of the tests
    python benchmarks/bench_async_save.py --device cuda --model tiny_llama3_150m --bf16 --seq-length 1024 \
        --micro-batch-size 4 --global-batch-size 4 --mock-data  # one GPU: pinned host buffers, non-blocking copies

Extra flags go to pretrain_llama.py; --train-iters and --save-interval default to 12 and 2. On a GPU give a
--save-interval whose iterations take longer than writing one checkpoint, or the async run also waits for the
previous save's writer (its log line says how long).
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megallama.arguments import parse_args  # noqa: E402
from megallama.checkpointing import run_saver  # noqa: E402
from megallama.training import pretrain  # noqa: E402

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--device", "cpu", "--mock-data", "--no-fused-kernels"]


def blocked_ms(argv, async_save: bool) -> tuple:
    real, times = run_saver.RunSaver.save, []

    def timed(self, step, consumed, wait=False):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = real(self, step, consumed, wait)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # what the next iteration's kernels wait for
        if not wait:
            times.append(1e3 * (time.perf_counter() - t0))
        return out

    save = tempfile.mkdtemp(prefix="bench_async_save_")
    run_saver.RunSaver.save = timed
    try:
        pretrain(parse_args(argv + ["--save", save, "--no-progress-bar", "--log-interval", "1000"] +
                            (["--async-save"] if async_save else [])))
        last = os.path.join(save, sorted(n for n in os.listdir(save) if n.startswith("iter_"))[-1])
        size = sum(os.path.getsize(os.path.join(last, n)) for n in os.listdir(last))
    finally:
        run_saver.RunSaver.save = real
        shutil.rmtree(save, ignore_errors=True)
    return statistics.median(times[1:] or times), size, len(times)


def main(extra) -> None:
    argv = (TINY if not extra else []) + ["--train-iters", "12", "--save-interval", "2"] + extra
    sync, size, n = blocked_ms(argv, False)
    asyn, _, _ = blocked_ms(argv, True)
    dev = torch.cuda.get_device_name() if "cuda" in " ".join(argv) else "CPU"
    print(f"checkpoint {size / 2**20:.1f} MiB on {dev}, median of {n - 1 or n} interval saves: loop blocked "
          f"{sync:.1f} ms synchronous, {asyn:.1f} ms with --async-save ({sync / max(asyn, 1e-6):.1f}x less)")


if __name__ == "__main__":
    main(sys.argv[1:])
