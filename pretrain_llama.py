#!/usr/bin/env python
"""Pretrain a Llama model: ``torchrun --nproc_per_node N pretrain_llama.py --model llama3_8b ...``.

Megatron-LM flag names (see ``megallama/arguments.py``); any user mistake prints one line and exits 2.
"""
import os
import sys

from megallama.errors import ConfigError


def main(argv=None) -> int:
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    try:
        args = parse_args(argv)
        pretrain(args)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank sees the same mistake; say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
