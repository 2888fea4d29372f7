#!/usr/bin/env python
"""Sample text from a checkpoint: ``python tools/generate.py --load checkpoints/tiny --prompt "The module"``.
Same as ``python -m megallama.cli generate``; flags in ``megallama/generation_cli.py``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.generation_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
