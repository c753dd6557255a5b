"""Builds the optional native extension (KV copies, the capture callback, the decode thread); the package works without
it (NumPy and Python fallbacks)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("asrkf_edge._native", ["native/kvcopy.c", "native/capture.c", "native/decoder.c"],
                  extra_compile_args=["-O3"], optional=True),
    ]
)
