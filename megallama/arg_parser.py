"""The argument parser of every megallama entry point (pretraining, the CLI's subcommands, the tools).

A mistyped flag is one line naming it, with the closest flag, as any user mistake (argparse's usage block would bury
it), and --help under torchrun prints once.
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag is one line, rank 0's, as any user mistake (argparse's ~80-line usage would bury it). No prefix
    abbreviations (Megatron's parsers allow none): ``--overwrit`` must not silently mean ``--overwrite``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        from megallama.initialize import report_config_error
        report_config_error(ConfigError(f"{message}; {self._did_you_mean(message)}see --help for the flags"))
        self.exit(2)

    def _did_you_mean(self, message: str) -> str:
        """'did you mean --train-iters? ' for a mistyped flag (the closest option string), else ''."""
        import difflib
        if not message.startswith("unrecognized arguments:"):
            return ""
        typed = next((w.split("=")[0] for w in message.split()[2:] if w.startswith("--")), None)
        flags = list(self._option_string_actions)
        for action in self._actions:  # subcommands' flags too (convert_checkpoint hf-to-megallama --hf-dir)
            if isinstance(action, argparse._SubParsersAction):
                flags += [f for sub in action.choices.values() for f in sub._option_string_actions]
        close = difflib.get_close_matches(typed, flags, n=1) if typed else []
        return f"did you mean {close[0]}? " if close else ""

    def print_help(self, file=None):
        """--help under torchrun: rank 0 prints it, the other ranks exit 0 silently (not one copy per rank)."""
        from megallama.initialize import launch_rank
        if launch_rank() == 0:
            super().print_help(file)
