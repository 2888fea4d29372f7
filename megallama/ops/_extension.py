"""Finds the compiled kernels (``torch.ops.megallama.*``): the installed ``megallama._C``, else a JIT build of
``csrc/`` (cached under TORCH_EXTENSIONS_DIR, built once), else none, with one warning, and the ops use their
PyTorch references. Nothing here runs at import time: the first op call loads the library.

Switches: ``MEGALLAMA_CPU_ARCH`` (default ``native``) sets the C++ target; ``MEGALLAMA_FUSED_KERNELS=0`` or
``set_fused_kernels(False)`` (the ``--no-fused-kernels`` flag) forces the references; ``MEGALLAMA_JIT=0`` skips
the JIT build; ``MEGALLAMA_BUILD_CUDA=0`` builds the JIT library without its CUDA kernels;
``MEGALLAMA_JIT_VERBOSE=1`` shows the compiler.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import threading
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# A JIT-built library's path, inherited by spawned workers so that they load it without asking ninja again.
_LIB_ENV = "MEGALLAMA_C_LIBRARY"

_lock = threading.Lock()
_state = {"enabled": os.environ.get("MEGALLAMA_FUSED_KERNELS", "1") != "0", "loaded": None, "cuda": False,
          "source": None}


def set_fused_kernels(enabled: bool) -> None:
    """Use the fused kernels (default) or force the PyTorch references (``--no-fused-kernels``)."""
    _state["enabled"] = bool(enabled)


def fused_kernels_enabled() -> bool:
    return _state["enabled"]


def kernel_source() -> str | None:
    """Where the kernels came from ('megallama._C', the JIT library's path), or None when they are absent."""
    return _state["source"] if load() else None


def cpu_arch_flags() -> list:
    """``-march=native`` unless ``MEGALLAMA_CPU_ARCH`` names another target (``x86-64-v3`` for a portable build;
    empty for the compiler's default). Without it gcc vectorises the kernels for SSE2 only, and the fused SwiGLU
    ran 2.5x slower than PyTorch's AVX-512 silu on an AMD EPYC (30.1 vs 12.2 ms fwd+bwd; 6.9 ms with it:
    benchmarks/RESULTS.md). The JIT library is built on the machine that runs it."""
    arch = os.environ.get("MEGALLAMA_CPU_ARCH", "native")
    return [f"-march={arch}"] if arch else []


def cublas_build_flags(cuda_home) -> tuple:
    """(macros, libraries) for the CUDA build's cuBLAS use (csrc/gemm_accum.cpp): ``MEGALLAMA_WITH_CUBLAS`` and
    ``cublas`` where the toolkit has the library and the headers torch's CUDAContextLight.h includes; a trimmed
    toolkit without them builds everything else. Also read by setup.py."""
    if not cuda_home:
        return [], []
    inc = os.path.join(cuda_home, "include")
    headers = all(os.path.isfile(os.path.join(inc, h)) for h in ("cublas_v2.h", "cublasLt.h", "cusparse.h",
                                                                   "cusolverDn.h"))
    lib = any(glob.glob(os.path.join(cuda_home, d, "libcublas.so*")) for d in ("lib64", "lib"))
    return (["MEGALLAMA_WITH_CUBLAS"], ["cublas"]) if headers and lib else ([], [])


def _host_cpu_tag() -> str:
    """With ``-march=native`` a build is only valid on CPUs like this one: a cache shared over NFS by nodes of
    different CPU types must not hand one node's AVX-512 library to another (illegal instruction), so the cache
    name carries a hash of this CPU's feature flags."""
    if cpu_arch_flags() != ["-march=native"]:
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform
        flags = platform.machine() + platform.processor()
    return "_" + hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]


def _jit_build() -> str:
    from torch.utils.cpp_extension import CUDA_HOME, load as cpp_load

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no C++ sources in {_CSRC}")
    want_cuda = os.environ.get("MEGALLAMA_BUILD_CUDA")
    with_cuda = torch.cuda.is_available() and CUDA_HOME is not None and want_cuda != "0"
    # no-trapping-math lets gcc if-convert clamps and vectorise
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math"] + cpu_arch_flags()
    kwargs, ldflags = {}, ["-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(_CSRC, "*.cu")))
        macros, libs = cublas_build_flags(CUDA_HOME)
        cflags += ["-DMEGALLAMA_WITH_CUDA"] + [f"-D{m}" for m in macros]
        ldflags += [f"-l{lib}" for lib in libs]
        kwargs["extra_cuda_cflags"] = ["-O3", "--use_fast_math", "-DMEGALLAMA_WITH_CUDA"]
    name = ("megallama_C_cuda" if with_cuda else "megallama_C_cpu") + _host_cpu_tag()  # a cache per build kind
    cpp_load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags, is_python_module=False,
             verbose=os.environ.get("MEGALLAMA_JIT_VERBOSE") == "1", **kwargs)
    return next((p for p in torch.ops.loaded_libraries if os.path.basename(p).startswith(name)), name)


def _load() -> tuple[bool, str]:
    try:
        import megallama._C  # noqa: F401  (registers torch.ops.megallama)

        return True, "megallama._C"
    except ImportError as e:
        reason = f"megallama._C not built ({e})"
    lib = os.environ.get(_LIB_ENV)
    if lib and os.path.exists(lib):
        try:
            torch.ops.load_library(lib)
            return True, lib
        except Exception as e:  # noqa: BLE001 - a stale path falls through to a fresh build
            reason = f"{lib}: {e}"
    if os.environ.get("MEGALLAMA_JIT", "1") == "0":
        return False, reason + "; MEGALLAMA_JIT=0"
    try:
        path = _jit_build()
        os.environ[_LIB_ENV] = path
        return True, path
    except Exception as e:  # noqa: BLE001 - any build failure means: use the references
        return False, f"{reason}; JIT build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"


def library_path(source: str) -> str:
    """The file behind a load ``source`` ('megallama._C' or a JIT library's path)."""
    mod = sys.modules.get(source)
    return getattr(mod, "__file__", None) or source


def _warn_if_static_cxx_runtime(source: str) -> None:
    from megallama.ops._elf import links_cxx_runtime_statically
    path = library_path(source)
    if sys.platform.startswith("linux") and links_cxx_runtime_statically(path):
        warnings.warn(f"megallama: {path} was linked with its own static libstdc++ (CXX={os.environ.get('CXX', 'c++')} "
                      "does that); an error raised inside a fused kernel would crash the process instead of raising. "
                      "Rebuild with a compiler that links libstdc++ dynamically, e.g. CXX=/usr/bin/g++",
                      RuntimeWarning, stacklevel=4)


def load() -> bool:
    """True when torch.ops.megallama holds the kernels, loading them on the first call (thread-safe)."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            ok, source = _load()
            if ok:
                from megallama.ops import _registry

                _registry.register()
                _state["cuda"] = bool(torch.ops.megallama.cuda_built())
                _state["source"] = source
                _warn_if_static_cxx_runtime(source)
            else:
                warnings.warn(f"megallama: fused kernels unavailable, using the PyTorch reference ops: {source}",
                              RuntimeWarning, stacklevel=3)
            _state["loaded"] = ok
    return _state["loaded"]


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors should take the fused path: enabled, loaded, and a kernel for the device."""
    if not _state["enabled"]:
        return False
    dev = tensors[0].device.type
    if dev not in ("cpu", "cuda", "meta") or any(t.device.type != dev for t in tensors):
        return False
    if not load():
        return False
    if dev == "cuda":
        return _state["cuda"] and all(t.dtype != torch.float64 for t in tensors)
    return True


def has_op(name: str) -> bool:
    """A library built before an op existed (a stale megallama._C) lacks it: callers use the reference then."""
    try:
        getattr(torch.ops.megallama, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def use_fused_op(name: str, *tensors: torch.Tensor) -> bool:
    """``use_fused`` for an op that meta tensors do not run, and that a stale library may lack."""
    return use_fused(*tensors) and tensors[0].device.type != "meta" and has_op(name)
