#!/usr/bin/env python
"""Pretrain a Llama model: ``torchrun --nproc_per_node N pretrain_llama.py --model llama3_8b ...``.

Megatron-LM flag names (see ``megallama/arguments.py``); any user mistake prints one line and exits 2.
"""
import sys


def main(argv=None) -> int:
    from megallama.arguments import parse_args
    from megallama.initialize import run_script
    from megallama.training import pretrain
    return run_script(lambda: pretrain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
