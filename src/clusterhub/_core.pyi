# Stub for the cffi-compiled module built from csrc/ by csrc/build_core.py.
# Its functions are declared in csrc/cdef_*.h; only _bindings.py imports it.
from typing import Any

ffi: Any
lib: Any
