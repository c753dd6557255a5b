"""The optional native library (``native/*.c``, built by the normal install), loaded once through ctypes.

``ASRKF_EDGE_NATIVE=0`` makes :func:`load` return None, so every caller takes its pure-Python path.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

log = logging.getLogger(__name__)


@cache
def load() -> ctypes.CDLL | None:
    """The native library, or None when it is not built or disabled."""
    if os.environ.get("ASRKF_EDGE_NATIVE", "1") == "0":
        return None
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError:
        # Said once, loudly: on an H200 the Python capture callback (a call per graph node) made asrkf's decode
        # 2.9x slower on the default model's shape (4.3 against 1.5 ms; docs/gpu.md, eighteenth session).
        log.warning("asrkf_edge's native library is not built: capture and copies take the Python paths, several "
                    "times slower per decode on a GPU; reinstall with a C compiler (pip install -e .)")
        return None
    return ctypes.CDLL(_native.__file__)
