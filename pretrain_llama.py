#!/usr/bin/env python
"""Pretrain a Llama model: ``torchrun --nproc_per_node N pretrain_llama.py --model llama3_8b ...``.

Megatron-LM flag names (see ``megallama/arguments.py``); any user mistake prints one line and exits 2.
``--auto-configure`` picks the layout (``megallama/autoconfig_args.py``); with ``--dry-run`` it only prints it.
``--dry-run`` from one process plans the ``--gpus`` x ``--nodes`` launch (the resolved flags and the per-GPU memory
estimate, as ``megallama train --dry-run``); under torchrun it builds the model on every rank and stops there.
"""
import os
import sys


def main(argv=None) -> int:
    from megallama.arguments import parse_args
    from megallama.initialize import run_script
    from megallama.training import pretrain
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dry-run" in argv and "--auto-configure" not in argv and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from megallama.cli import dry_run  # one process plans the --gpus x --nodes launch (megallama train's)
        return run_script(lambda: dry_run(argv))

    def body():
        args = parse_args(argv)  # with --auto-configure this prints the chosen layout (rank 0)
        if not (args.dry_run and args.auto_configure):  # a planned layout needs no model built to be shown
            pretrain(args)
    return run_script(body)


if __name__ == "__main__":
    sys.exit(main())
