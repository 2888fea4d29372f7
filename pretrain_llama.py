#!/usr/bin/env python
"""Pretrain a Llama model: ``torchrun --nproc_per_node N pretrain_llama.py --model llama3_8b ...``.

Megatron-LM flag names (see ``megallama/arguments.py``); any user mistake prints one line and exits 2.
``--auto-configure`` picks the layout (``megallama/autoconfig_args.py``); with ``--dry-run`` it only prints it.
"""
import sys


def main(argv=None) -> int:
    from megallama.arguments import parse_args
    from megallama.initialize import run_script
    from megallama.training import pretrain

    def body():
        args = parse_args(argv)  # with --auto-configure this prints the chosen layout (rank 0)
        if not (args.dry_run and args.auto_configure):  # a planned layout needs no model built to be shown
            pretrain(args)
    return run_script(body)


if __name__ == "__main__":
    sys.exit(main())
