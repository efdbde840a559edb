"""cffi builder for ``clusterhub._core`` (out-of-line API mode).

Not shipped in wheels; setup.py names it in ``cffi_modules``.

This file only lists the C sources and reads what cffi sees of them (the
``cdef_*.h`` files); the C itself, the module's preamble included, lives in
``csrc/``.  The module keeps the GIL across its C calls except in the
``*_nogil`` wrappers (``core.h`` and ``nogil.h`` say why and how).
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# Pure-C units (<unit>.c, <unit>.h, cdef_<unit>.h): also built, without
# Python, into the C drivers and fuzzers.
C_UNITS = ("frame", "locktable", "wait")
# Header-only: the message envelope (static inline helpers and constants).
HEADERS = ("envelope",)
# Units written against the CPython API (the limited API of 3.10): compiled
# into this module only.  cffi calls the *_nogil wrappers, and the functions
# that set LockBase, decode_messages (and its kin) and Reply as attributes of
# the module.
PY_UNITS = ("nogil", "lockhandle", "decode", "reply")

ffi = FFI()
# In this order: cdef_nogil.h uses the types of cdef_frame.h, cdef_locktable.h
# and cdef_wait.h.
ffi.cdef("\n".join((HERE / f"cdef_{u}.h").read_text() for u in C_UNITS + HEADERS + PY_UNITS))
# cffi builds the module for the stable ABI (setuptools' py_limited_api=True,
# its default except on debug and free-threaded interpreters): one
# _core.abi3.so, which setup.py tags cp310-abi3 (the PY_UNITS keep to the
# limited API of 3.10; cffi's own code to an older one).
ffi.set_source(
    "clusterhub._core",
    '#include "core.h"\n',  # csrc/core.h: the module's preamble
    # Relative paths: setuptools wants them relative to the project root.
    sources=[f"csrc/{u}.c" for u in C_UNITS + PY_UNITS],
    include_dirs=["csrc"],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-O2"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
