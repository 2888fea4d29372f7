"""``torch.compiler.disable`` that does not import ``torch._dynamo`` when the module using it is imported.

Importing dynamo costs ~3.5 s of CPU, which a decorator evaluated at import time charged to every process (each CPU
rank, each CLI call) although only ``--compile`` needs it. Nothing can be compiling before dynamo is imported, so
until then the function runs as it is; from the first call after (or ``resolve()``, which ``--compile`` calls before
tracing, so that no graph sees the switch), it runs as ``torch.compiler.disable(fn)``.
"""
from __future__ import annotations

import functools
import sys

_RESOLVERS = []


def disable(fn):
    disabled = None

    def resolve():
        nonlocal disabled
        if disabled is None:
            import torch.compiler
            disabled = torch.compiler.disable(fn)
        return disabled

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if disabled is None and "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        return resolve()(*args, **kwargs)

    _RESOLVERS.append(resolve)
    return wrapper


def resolve() -> None:
    """Switch every wrapped function to its disabled form now (imports dynamo)."""
    for r in _RESOLVERS:
        r()
