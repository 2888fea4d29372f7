"""The issue's name for the kernel benchmark (``tools/benchmark.py --kernels`` may call ``main``): see
bench_kernels.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import main  # noqa: E402

if __name__ == "__main__":
    main()
