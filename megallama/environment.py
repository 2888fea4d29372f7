"""``validate_environment()``: what this machine can run, as lists of errors and warnings (the CLI prints them).

Checks: Python and torch versions, CUDA and the GPUs (count, memory, bf16), NCCL, the fused kernels (built
extension, a cached JIT build, or the PyTorch reference ops; nothing is compiled here), free disk space.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Optional


def _kernels() -> str:
    try:
        import megallama._C  # noqa: F401
        return "built (megallama._C)"
    except ImportError:
        pass
    lib = os.environ.get("MEGALLAMA_C_LIBRARY")
    if lib and os.path.exists(lib):
        return f"JIT build {lib}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    found = sorted(glob.glob(os.path.join(root, "*", "megallama_C_*", "*.so")))
    return f"JIT build cached {found[-1]}" if found else ""


def validate_environment(path: Optional[str] = None, min_free_gb: float = 10.0) -> dict:
    """{"errors": [...], "warnings": [...], "info": {...}}; errors mean training cannot run here."""
    errors, warnings, info = [], [], {}
    info["python"] = sys.version.split()[0]
    if sys.version_info < (3, 9):
        errors.append(f"Python {info['python']} is too old; use Python 3.9 or newer")
    try:
        import torch
    except ImportError:
        errors.append("torch is not installed; pip install torch>=2.3")
        return {"errors": errors, "warnings": warnings, "info": info}
    info["torch"] = torch.__version__
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 3):
        errors.append(f"torch {torch.__version__} is too old; megallama needs torch >= 2.3 (SDPA with enable_gqa)")
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        info.update(gpus=n, gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
        if not info["bf16"]:
            warnings.append(f"{props.name} has no bf16 support; train with --fp16 (dynamic loss scaling)")
    else:
        warnings.append("no CUDA device visible: training runs on CPU (fine for the tiny models and tests only)")
    import torch.distributed as dist
    info["nccl"] = dist.is_available() and dist.is_nccl_available()
    if torch.cuda.is_available() and not info["nccl"]:
        errors.append("this torch build has no NCCL; multi-GPU training needs a CUDA build of torch with NCCL")
    if not dist.is_available():
        errors.append("torch.distributed is not available in this torch build")
    kernels = _kernels()
    info["fused_kernels"] = kernels or "not built"
    if not kernels:
        warnings.append("fused kernels not built: the first run compiles csrc/ (needs a C++ compiler, about a "
                        "minute; pip install -e . --no-build-isolation builds them ahead) or falls back to the "
                        "PyTorch reference ops")
    where = os.path.abspath(path or os.getcwd())
    while not os.path.exists(where) and os.path.dirname(where) != where:  # a --save still to be made: its disk
        where = os.path.dirname(where)
    try:
        free = shutil.disk_usage(where).free / 2**30
        info["free_disk_gib"] = round(free, 1)
        if free < min_free_gb:
            warnings.append(f"only {free:.1f} GiB free on {where}; checkpoints need room (a 8B checkpoint with "
                            "optimizer state is ~100 GB)")
    except OSError as e:
        warnings.append(f"cannot read free disk space of {where}: {e}")
    return {"errors": errors, "warnings": warnings, "info": info}


def format_environment(report: dict) -> str:
    lines = [f"{k}: {v}" for k, v in report["info"].items()]
    lines += [f"error: {e}" for e in report["errors"]] + [f"warning: {w}" for w in report["warnings"]]
    lines.append("environment ready for training" if not report["errors"] else "environment NOT ready")
    return "\n".join(lines)
