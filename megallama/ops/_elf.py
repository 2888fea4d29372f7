"""Which shared libraries an ELF object needs (its DT_NEEDED entries), read from the file: enough to tell that a
kernel library carries its own copy of the C++ runtime.

Why it matters: a C++ error raised inside an op (``TORCH_CHECK``) is caught by libtorch. When the library was linked
with a static libstdc++ (some compiler wrappers do this: the device image's ``/opt/gcc/bin/g++``), the exception
crosses two C++ runtimes and the process dies with a segmentation fault instead of raising. Every C++ object needs
libstdc++, so a build that does not list it has linked it in.
"""
from __future__ import annotations

import struct
from typing import List, Optional

_PT_LOAD, _PT_DYNAMIC, _DT_NULL, _DT_NEEDED, _DT_STRTAB = 1, 2, 0, 1, 5


def needed_libraries(path: str) -> Optional[List[str]]:
    """DT_NEEDED entries of a little-endian ELF64 object, in order; None when ``path`` is not one (or unreadable)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return None
    names, strtab = [], None
    for off in range(dynamic[0], dynamic[0] + dynamic[1] - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            names.append(val)
        elif tag == _DT_STRTAB:
            strtab = val
    base = None if strtab is None else next((o + strtab - v for v, o, n in loads if v <= strtab < v + n), None)
    if base is None:
        return None
    return [data[base + i:data.index(b"\0", base + i)].decode(errors="replace") for i in names]


def links_cxx_runtime_statically(path: str) -> bool:
    """True when ``path`` is an ELF object that does not need libstdc++ (so, for C++ code, carries its own copy)."""
    needed = needed_libraries(path)
    return needed is not None and not any(n.startswith(("libstdc++", "libc++")) for n in needed)
