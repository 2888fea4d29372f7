"""Builds the optional ``megallama._C`` extension from csrc/.

pip builds in an isolated environment without torch, so nothing here may need torch to succeed: when torch is
importable (``pip install -e . --no-build-isolation``) the extension is compiled ahead of time (CUDA sources too
when nvcc and a CUDA torch exist; ``MEGALLAMA_BUILD_CUDA=0/1`` overrides), otherwise the package installs pure
Python and ``megallama.ops`` JIT-compiles the same sources on first use (see ``megallama/ops/_extension.py``).
"""
import glob
import os

from setuptools import setup


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
    # no-trapping-math lets gcc if-convert clamps and vectorise; the target as in megallama/ops/_extension.py
    # (MEGALLAMA_CPU_ARCH, default native: SSE2-only code ran the fused SwiGLU 2.5x slower than PyTorch's).
    arch = os.environ.get("MEGALLAMA_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"] + ([f"-march={arch}"] if arch else [])
    if use_cuda:
        cu = sorted(glob.glob("csrc/*.cu"))  # named *_cuda.cu: setuptools puts x.cpp and x.cu both in x.o
        # Arch list from TORCH_CUDA_ARCH_LIST (e.g. "9.0a" for H100 only), else torch's default for the visible GPU.
        ext = CUDAExtension("megallama._C", cpp + cu, define_macros=[("MEGALLAMA_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("megallama._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
