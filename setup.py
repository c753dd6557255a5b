"""Builds the optional native KV-copy extension; the package works without it (NumPy fallback)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("asrkf_edge._native", ["native/kvcopy.c", "native/capture.c"], extra_compile_args=["-O3"], optional=True),
    ]
)
