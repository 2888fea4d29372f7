#!/usr/bin/env python
"""Where does a training run make the host wait for the GPU? Runs ``pretrain`` under
``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronising calls by megallama call site.

    python benchmarks/sync_probe.py --model tiny_llama3_150m --strategy moe --num-experts 8 --bf16 --mock-data \\
        --micro-batch-size 8 --seq-length 2048 --global-batch-size 8 --train-iters 3 --log-interval 1

A healthy step syncs a few times (the loss and the clipped gradient norm); a count that scales with the number of
layers marks a per-layer sync (a host copy, ``.item()``, a pageable host-to-device copy) that stalls the queue.
Needs CUDA."""
import collections
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megallama.arguments import parse_args  # noqa: E402
from megallama.training import pretrain  # noqa: E402


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("error: the sync probe needs a CUDA device", file=sys.stderr)
        return 2
    counts = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if "megallama" in f.filename]
            counts[" <- ".join(f"{os.path.relpath(f.filename)}:{f.lineno}" for f in stack[-3:][::-1])] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    pretrain(parse_args(argv))
    torch.cuda.set_sync_debug_mode("default")
    print("synchronising calls over the run, by call site (innermost first):")
    for where, n in counts.most_common(25):
        print(f"{n:6d}  {where or '(outside megallama)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
