"""The static-libstdc++ check: the kernel library built here needs the shared C++ runtime (so its errors raise),
a C library does not, and a build without it gets one warning naming the fix."""
import ctypes.util
import glob
import sys
import warnings

import pytest

from kernel_checks import require_kernels
from megallama.ops import _extension
from megallama.ops._elf import links_cxx_runtime_statically, needed_libraries

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF objects: Linux only")


def _libm():
    found = glob.glob("/lib/x86_64-linux-gnu/libm.so.6") + glob.glob("/usr/lib*/libm.so.6") + \
        glob.glob("/lib*/libm.so.6")
    if not found:
        pytest.skip(f"no libm.so.6 found ({ctypes.util.find_library('m')})")
    return found[0]


def test_built_kernels_need_the_shared_cxx_runtime():
    require_kernels()
    path = _extension.library_path(_extension.kernel_source())
    needed = needed_libraries(path)
    assert needed and any(n.startswith("libc10") for n in needed), (path, needed)
    assert not links_cxx_runtime_statically(path), needed


def test_a_c_library_reads_as_static_and_other_files_as_unknown(tmp_path):
    libm = _libm()
    assert needed_libraries(libm) and not any("stdc++" in n for n in needed_libraries(libm))
    assert links_cxx_runtime_statically(libm)
    text = tmp_path / "not_elf.so"
    text.write_text("not an ELF file")
    assert needed_libraries(str(text)) is None and not links_cxx_runtime_statically(str(text))
    assert needed_libraries(str(tmp_path / "missing.so")) is None


def test_warning_names_the_fix():
    libm = _libm()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        _extension._warn_if_static_cxx_runtime(libm)
    assert len(got) == 1 and "static libstdc++" in str(got[0].message) and "CXX=/usr/bin/g++" in str(got[0].message)
