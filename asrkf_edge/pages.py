"""Pages faulted in ahead of the writes that will need them, on a background thread (Linux's ``MADV_POPULATE_WRITE``).

Where the layers are on a GPU, the host's cores are idle while it decodes, and a write into never-touched pages
pays a page fault per 4 KB on the thread that writes: a freeze of 88 tokens of the LLaMA-3-8B shape took 27-34 ms
into fresh store pages against 2.5-2.7 ms into faulted ones (2-core EPYC VM). The store's arenas and the key
mirror ask for their next pages here. The populate leaves the bytes alone, so it may run while the owner writes the
same pages; elsewhere than Linux 5.14+ (or where the mapping refuses it) it does nothing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np

_MADV_POPULATE_WRITE = 23  # Linux 5.14+: map pages writable without touching their bytes

log = logging.getLogger(__name__)
populate_ok = sys.platform.startswith("linux")  # cleared where the kernel or a file system refuses it


@cache
def _madvise() -> Any:
    """libc's madvise through ctypes, which lets go of the GIL while it runs (the mmap module's keeps it)."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


@cache
def prefaulter() -> ThreadPoolExecutor:
    """The one thread that faults pages in, in the order they were asked for."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="asrkf-prefault")


def _populate(owner: np.ndarray, ranges: Sequence[tuple[int, int]]) -> None:
    """Fault byte ranges of ``owner``'s memory in, writable, in order (``owner`` stays alive while this runs)."""
    global populate_ok
    page, base = os.sysconf("SC_PAGESIZE"), owner.ctypes.data
    for start, end in ranges:
        a, b = (base + start) // page * page, -(-(base + end) // page) * page
        if not populate_ok:
            return
        if _madvise()(a, b - a, _MADV_POPULATE_WRITE) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.EOPNOTSUPP):  # a kernel before 5.14, or a mapping without it
            populate_ok = False
        log.debug("pages not faulted in ahead: %s", os.strerror(err))
        return


def fault_in(owner: np.ndarray, ranges: Sequence[tuple[int, int]]) -> Future[None] | None:
    """Have byte ranges ``[start, end)`` of ``owner`` (an array over its own or a file's mapping) faulted in on the
    background thread, in the order given; None where this cannot be done."""
    if not populate_ok or not ranges:
        return None
    return prefaulter().submit(_populate, owner, list(ranges))
