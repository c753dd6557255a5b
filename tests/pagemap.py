"""Which pages of an array are mapped in this process (Linux's /proc/self/pagemap)."""

from __future__ import annotations

import mmap

import numpy as np


def mapped(a: np.ndarray) -> np.ndarray:
    """Per page of ``a``'s memory: present in this process's page table (pagemap, bit 63)."""
    first, n = a.ctypes.data // mmap.PAGESIZE, -(-a.nbytes // mmap.PAGESIZE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read(n * 8), np.uint64)
    return (entries >> np.uint64(63)).astype(bool)
