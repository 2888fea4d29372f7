"""Builds the optional ``megallama._C`` extension from csrc/.

pip builds in an isolated environment without torch, so nothing here may need torch to succeed: when torch is
importable (``pip install -e . --no-build-isolation``) the extension is compiled ahead of time (CUDA sources too
when nvcc and a CUDA torch exist; ``MEGALLAMA_BUILD_CUDA=0/1`` overrides), otherwise the package installs pure
Python and ``megallama.ops`` JIT-compiles the same sources on first use (see ``megallama/ops/_extension.py``).
"""
import glob
import importlib.util
import os

from setuptools import setup


def _build_helpers():
    """megallama/ops/_extension.py (stdlib + torch only) loaded by path: the build flags the JIT build uses too,
    without importing the package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megallama", "ops", "_extension.py")
    spec = importlib.util.spec_from_file_location("_megallama_build_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    if os.environ.get("MEGALLAMA_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
    except Exception:
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return [], {}
    want_cuda = os.environ.get("MEGALLAMA_BUILD_CUDA")
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    use_cuda = has_cuda if want_cuda is None else (want_cuda == "1" and has_cuda)
    helpers = _build_helpers()
    # no-trapping-math lets gcc if-convert clamps and vectorise; the target from MEGALLAMA_CPU_ARCH (default native:
    # SSE2-only code ran the fused SwiGLU 2.5x slower than PyTorch's)
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"] + helpers.cpu_arch_flags()
    if use_cuda:
        cu = sorted(glob.glob("csrc/*.cu"))  # named *_cuda.cu: setuptools puts x.cpp and x.cu both in x.o
        macros, libs = helpers.cublas_build_flags(CUDA_HOME)
        # Arch list from TORCH_CUDA_ARCH_LIST (e.g. "9.0a" for H100 only), else torch's default for the visible GPU.
        macros = [(m, None) for m in ["MEGALLAMA_WITH_CUDA"] + macros]
        ext = CUDAExtension("megallama._C", cpp + cu, define_macros=macros, libraries=libs,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("megallama._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
