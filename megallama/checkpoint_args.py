"""Megatron-LM's flags for how checkpoints are saved: ``--async-save`` (checkpointing/async_save.py) and the
companions Megatron scripts pass with it, accepted because megallama does what they ask for either way."""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError

# Megatron flag -> why it needs nothing here (megallama has one sharded format, Megatron's torch_dist in spirit)
_ACCEPTED = {"--ckpt-fully-parallel-save": "every rank writes the pieces it owns, once, in parallel",
             "--no-ckpt-fully-parallel-save": "the pieces are written by the ranks that own them either way (and "
                                              "stay reshardable)",
             "--ckpt-fully-parallel-load": "every rank reads only its own slices",
             "--ckpt-assume-constant-structure": "async saves reuse their pinned host buffers whenever a tensor's "
                                                 "name, shape and dtype repeat",
             "--use-persistent-ckpt-worker": "the writer is a thread; starting one costs microseconds",
             "--use-dist-ckpt": "the one format is sharded (torch_dist)",
             "--auto-detect-ckpt-format": "there is one format to detect"}


def add_async_save_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint saving (Megatron's flags)", "accepted as no-ops: " + "; ".join(
        f"{flag} ({why})" for flag, why in _ACCEPTED.items()))
    g.add_argument("--async-save", action="store_true", help="write checkpoints in the background: training waits "
                   "only for the copy to host memory; a save becomes the latest once every rank has written it "
                   "(at the latest at the next save, the end of training or an exit)")
    for flag in _ACCEPTED:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--dist-ckpt-format", choices=["torch_dist"], default=None, help=argparse.SUPPRESS)


def check_checkpoint_flags(args) -> None:
    """Flags that write into --save do nothing without it: one error line rather than a silently ignored flag."""
    for flag, on in (("--async-save", getattr(args, "async_save", False)),
                     ("--log-progress", getattr(args, "log_progress", False))):
        if on and not getattr(args, "save", None):
            raise ConfigError(f"{flag} writes into the --save directory, but no --save was given; add --save DIR "
                              f"or drop {flag}")
