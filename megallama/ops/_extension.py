"""Finds the compiled kernels (``torch.ops.megallama.*``): the installed ``megallama._C``, else a JIT build of
``csrc/`` (cached under TORCH_EXTENSIONS_DIR, built once), else none, with one warning, and the ops use their
PyTorch references. Nothing here runs at import time: the first op call loads the library.

Switches: ``MEGALLAMA_CPU_ARCH`` (default ``native``) sets the C++ target; ``MEGALLAMA_FUSED_KERNELS=0`` or
``set_fused_kernels(False)`` (the ``--no-fused-kernels`` flag) forces the references (the variable wins over
``set_fused_kernels(True)``); ``MEGALLAMA_JIT=0`` skips the JIT build; ``MEGALLAMA_BUILD_CUDA=0`` builds the JIT
library without its CUDA kernels; ``MEGALLAMA_JIT_VERBOSE=1`` shows the compiler.

The JIT cache is one folder per environment (``jit_name``): a venv and the system Python with the same torch
used to rewrite each other's build.ninja and rebuild each other's library. A build announces itself in one line
(minutes on a small CPU box), and a torch build lock left by a killed build is removed (``_exclusive_build``)
rather than waited on forever.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import threading
import time
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# A JIT-built library's path, inherited by spawned workers so that they load it without asking ninja again.
_LIB_ENV = "MEGALLAMA_C_LIBRARY"

_lock = threading.Lock()
_state = {"enabled": os.environ.get("MEGALLAMA_FUSED_KERNELS", "1") != "0", "loaded": None, "cuda": False,
          "source": None}


def set_fused_kernels(enabled: bool) -> None:
    """Use the fused kernels (default) or force the PyTorch references (``--no-fused-kernels``). With
    ``MEGALLAMA_FUSED_KERNELS=0`` they stay off: training calls this with its flag, which turned them back on."""
    _state["enabled"] = bool(enabled) and os.environ.get("MEGALLAMA_FUSED_KERNELS", "1") != "0"


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


def _jit_config() -> dict:
    """What the JIT build compiles and with which flags (the cache name hashes it all)."""
    from torch.utils.cpp_extension import CUDA_HOME

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
    return {"sources": sources, "extra_cflags": cflags, "extra_ldflags": ldflags, "with_cuda": with_cuda, **kwargs}


def jit_name(config: dict | None = None) -> str:
    """The JIT cache folder's name: build kind, CPU tag, and a hash of this environment (interpreter prefix and
    version, the torch installation, the csrc/ folder) and the flags. Without the environment, two environments
    with one torch version shared a folder, each rebuilding the other's library."""
    config = config or _jit_config()
    env = [sys.prefix, sys.version, os.path.dirname(torch.__file__), torch.__version__, _CSRC,
           repr(sorted((k, v) for k, v in config.items() if k != "sources"))]
    digest = hashlib.sha1("\0".join(env).encode()).hexdigest()[:8]
    kind = "megallama_C_cuda" if config["with_cuda"] else "megallama_C_cpu"
    return f"{kind}{_host_cpu_tag()}_{digest}"


def _is_rank_0() -> bool:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _say(line: str) -> None:
    print(f"megallama: {line}", flush=True)


@contextlib.contextmanager
def _exclusive_build(build_dir: str):
    """Held around torch's build: an flock on ``megallama_build.pid`` (holding the pid, for the message). The
    kernel releases an flock when its holder dies, so holding it proves no build of this folder is running on
    this machine; a torch ``lock`` (a FileBaton: a bare file, no owner, never expires) found then was left by a
    killed build, and is removed instead of waited on forever. A live build is waited for, as torch would."""
    baton, pid_file = os.path.join(build_dir, "lock"), os.path.join(build_dir, "megallama_build.pid")
    fd = os.open(pid_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _flock(fd, pid_file, baton):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            if os.path.exists(baton):
                _say(f"build lock {baton} is stale (left by an interrupted build; no build holds it): removed")
                os.remove(baton)
        yield
    finally:
        os.close(fd)  # releases the flock


def _flock(fd: int, pid_file: str, baton: str) -> bool:
    """Takes the flock, waiting (in one line, rank 0) for a live build; False where the filesystem has no flock:
    torch's own wait then, said in one line when a lock is there."""
    import fcntl

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _is_rank_0():
                with open(pid_file) as f:
                    holder = f.read().strip() or "?"
                _say(f"waiting for the fused-kernel build of pid {holder} ({baton}; a lock left by a killed build "
                     "is removed once no build holds it)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError as e:
        if os.path.exists(baton):
            _say(f"build lock {baton} exists and this filesystem cannot tell whether a build holds it ({e}); "
                 "waiting: remove it if no build is running")
        return False


def _library_fresh(build_dir: str, name: str, sources: list) -> bool:
    """The cached library is newer than every source and header: torch's ninja run is then a no-op."""
    lib = os.path.join(build_dir, name + ".so")
    inputs = sources + glob.glob(os.path.join(_CSRC, "*.h")) + glob.glob(os.path.join(_CSRC, "*.cuh"))
    return os.path.exists(lib) and os.path.getmtime(lib) >= max(os.path.getmtime(p) for p in inputs)


def _minutes_estimate(n_sources: int) -> int:
    """About 10 CPU-minutes in all (297 s on 2 cores), spread over the cores ninja can use, one per source."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, round(10 / max(1, min(cores, n_sources))))


def _jit_build() -> str:
    from torch.utils.cpp_extension import _get_build_directory, load as cpp_load

    config = _jit_config()
    name, sources, with_cuda = jit_name(config), config["sources"], config["with_cuda"]
    flags = {k: v for k, v in config.items() if k not in ("sources", "with_cuda")}
    verbose = os.environ.get("MEGALLAMA_JIT_VERBOSE") == "1"
    build_dir = _get_build_directory(name, verbose)
    with _exclusive_build(build_dir):
        fresh = _library_fresh(build_dir, name, sources)
        if not fresh:  # one builder per folder and machine (the flock): its line is said once
            extra = ", longer with the CUDA kernels" if with_cuda else ""
            _say(f"compiling fused kernels for this environment (once; ~{_minutes_estimate(len(sources))} min on "
                 f"CPU{extra}) -> {build_dir}; --no-fused-kernels skips them")
        start = time.time()
        cpp_load(name=name, sources=sources, is_python_module=False, verbose=verbose, build_directory=build_dir,
                 **flags)
        if not fresh:
            _say(f"fused kernels compiled in {time.time() - start:.0f} s")
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
