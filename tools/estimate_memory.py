#!/usr/bin/env python
"""Estimate per-GPU training memory (no GPU needed): ``python tools/estimate_memory.py --model llama2_7b --gpus 4``.
Same as ``python -m megallama.cli estimate-memory``; flags in ``megallama/memory_cli.py``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.memory_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
