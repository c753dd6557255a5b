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

_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+: map pages (writable) without touching their bytes
_LINUX = sys.platform.startswith("linux")

log = logging.getLogger(__name__)
populate_ok = _LINUX  # the background faults: cleared where the kernel or a file system refuses them


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


def _advise(start: int, end: int, write: bool) -> int:
    """madvise's populate over the pages holding addresses [start, end): 0, or -1 (errno set)."""
    page = os.sysconf("SC_PAGESIZE")
    a, b = start // page * page, -(-end // page) * page
    return _madvise()(a, b - a, _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ)


def populate(buf: np.ndarray, write: bool) -> None:
    """Fault ``buf``'s pages in now (writable with ``write``), one system call instead of a trap per 4 KB during the
    copy that follows: fresh store arenas and blobs are mostly untouched pages. Contents are not changed; where the
    kernel lacks it (before Linux 5.14, or not Linux) the copy faults them in as before."""
    if _LINUX:
        _advise(buf.ctypes.data, buf.ctypes.data + buf.nbytes, write)


def _populate(owner: np.ndarray, ranges: Sequence[tuple[int, int]]) -> None:
    """Fault byte ranges of ``owner``'s memory in, writable, in order (``owner`` stays alive while this runs)."""
    global populate_ok
    base = owner.ctypes.data
    for start, end in ranges:
        if not populate_ok:
            return
        if _advise(base + start, base + end, True) == 0:
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
