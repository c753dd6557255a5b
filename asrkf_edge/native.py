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
        log.debug("native library not built; using the Python paths")
        return None
    return ctypes.CDLL(_native.__file__)
