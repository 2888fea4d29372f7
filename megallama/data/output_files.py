"""Output files of the asset tools (tokenizer, corpus, chat sample): an existing file is replaced only with
--overwrite, checked before any work, and written atomically (``checkpointing.files.atomic_write_bytes``)."""
from __future__ import annotations

import os

from megallama.checkpointing.files import atomic_write_bytes  # noqa: F401 (the tools write with it)
from megallama.errors import ConfigError


def check_output(output: str, overwrite: bool) -> None:
    """Refuse before any work: an existing file (a bundled asset, a data file) is replaced only on request."""
    if os.path.exists(output) and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise ConfigError(f"the folder of --output {output} does not exist; create it or choose another --output")
