# All metadata lives in pyproject.toml; this file only names the cffi builder.
from setuptools import setup

setup(cffi_modules=["csrc/build_core.py:ffi"])
