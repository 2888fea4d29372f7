"""A collective that failed because another rank is gone, as one line.

When a rank dies (killed, out of memory, ``os._exit``) or stalls past --distributed-timeout-minutes, every other rank
fails in its next collective with a backend error (gloo: "Connection closed by peer", "Timed out waiting 60000ms for
recv"; NCCL: a remote error, an aborted communicator, the watchdog's timeout). Its ~60-line traceback points at the
survivor's own code, which is not at fault; the dead rank's output and torchrun's summary say what happened. So
``run_script`` prints ``lost_contact_line`` instead. Recognition is by type and message, conservatively: anything
else (a genuine bug, a bad NCCL call) keeps its traceback.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import Optional

# What a backend says when the peer's end went away or never answered (matched text becomes the reason shown).
_GLOO = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|"
                   r"Timed out waiting \d+ms for \w+ operation to complete")
_NCCL = re.compile(r"remote process exited|ncclRemoteError|communicator was aborted|"
                   r"Watchdog caught collective operation timeout|Some NCCL operations have failed or timed out")
_STORE = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe")  # the TCPStore's host (rank 0) is gone


def collective_failure(e: BaseException) -> Optional[str]:
    """``backend: reason`` when ``e`` is a collective's failure caused by a lost peer, else None."""
    import torch.distributed as dist
    if not isinstance(e, RuntimeError):  # every c10d backend error is one (DistError derives from it)
        return None
    msg = str(e)
    if "gloo" in msg and (m := _GLOO.search(msg)):  # gloo's messages carry its source path
        return f"gloo: {m.group(0)}"
    if "NCCL" in msg and (m := _NCCL.search(msg)):
        return f"NCCL: {m.group(0)}"
    store_errors = tuple(getattr(dist, n) for n in ("DistNetworkError", "DistStoreError") if hasattr(dist, n))
    if store_errors and isinstance(e, store_errors) and (m := _STORE.search(msg)):
        return f"store: {m.group(0)}"
    return None


def _phase(e: BaseException) -> str:
    """Where this rank was: the collective (torch.distributed's innermost public function) and the innermost
    frame of the caller's code, e.g. ``all_reduce in finalize_model_grads (megallama/finalize_model_grads.py:40)``."""
    collective, caller = None, None
    for frame in traceback.extract_tb(e.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/distributed/" in path:
            if not frame.name.startswith("_") and frame.name != "wrapper":
                collective = frame.name
        elif "/torch/" not in path:
            here = path.rsplit("/megallama/", 1)
            where = f"megallama/{here[1]}" if len(here) == 2 else os.path.basename(path)
            caller = f"{frame.name} ({where}:{frame.lineno})"
    parts = [p for p in (collective, caller and (f"in {caller}" if collective else caller)) if p]
    return " ".join(parts) or "a collective"


def lost_contact_line(e: BaseException) -> Optional[str]:
    """The one line for a collective failure caused by a lost peer (None: not one; show the traceback)."""
    reason = collective_failure(e)
    if reason is None:
        return None
    return (f"lost contact with another rank during {_phase(e)} ({reason}); a rank died or stalled — see its own "
            "output above / torchrun's summary for which")
