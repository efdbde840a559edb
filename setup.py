# All metadata lives in pyproject.toml; this file names the cffi builder and
# tags the wheel for the stable ABI.
import sys
import sysconfig

from setuptools import setup

# cffi builds clusterhub._core for the stable ABI (an ``.abi3.so``) unless the
# interpreter is a debug or free-threaded build, and the units written against
# the CPython API (csrc/lockhandle.c, nogil.c, decode.c, reply.c) keep to the
# limited API of 3.10: one wheel then serves every
# CPython >= 3.10, so tag it cp310-abi3.  (On those other builds the module
# is version-specific, and so is the default tag.)
limited_api = not hasattr(sys, "gettotalrefcount") and not sysconfig.get_config_var("Py_GIL_DISABLED")

setup(
    cffi_modules=["csrc/build_core.py:ffi"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if limited_api else {},
)
