"""Copy KV rows between llama.cpp state blobs and the store's slots: native C when built, NumPy otherwise.

Both paths give identical bytes (tested). ``ASRKF_EDGE_NATIVE=0`` forces the NumPy path.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

import numpy as np

from . import blob as blobfmt
from . import native, pages
from .blob import Layout


@dataclass(frozen=True)
class Side:
    """One buffer holding ``n`` rows of KV: per-layer byte offsets of K rows and of V, the bytes from one row of
    a layer to the next (a blob packs rows; the store's slots hold one token each), and V's layout."""

    buf: np.ndarray  # uint8, flat
    k_off: np.ndarray  # int64 [n_layer]
    v_off: np.ndarray  # int64 [n_layer]
    n: int
    v_trans: bool
    k_stride: int
    v_stride: int  # unused when V is transposed


def blob_side(buf: np.ndarray, layout: Layout, n: int) -> Side:
    k_off, v_off = layout.offsets(n)
    return Side(buf, k_off, v_off, n, layout.v_trans, layout.k_row, layout.v_row)


def empty_blob(layout: Layout, pos: np.ndarray, seq: int, buf: np.ndarray | None = None, zero: bool = True) -> np.ndarray:
    """A state blob with cells at ``pos`` for sequence ``seq``, all headers filled in, in ``buf`` (reused memory) or
    a new array; K/V zero unless ``zero`` is False, for a caller that writes every cell's rows next."""
    n = len(pos)
    if buf is None:
        raw = np.zeros(layout.blob_size(n), dtype=np.uint8)
    else:
        raw = buf[: layout.blob_size(n)]
        if zero:
            raw[:] = 0
    hdr = blobfmt.header(layout, pos, seq)
    raw[: len(hdr)] = np.frombuffer(hdr, np.uint8)
    side = blob_side(raw, layout, n)
    kh, vh = np.frombuffer(blobfmt.k_header(layout), np.uint8), np.frombuffer(blobfmt.v_header(layout), np.uint8)
    for layer in range(layout.n_layer):
        raw[side.k_off[layer] - 12 : side.k_off[layer]] = kh
        raw[side.v_off[layer] - 12 : side.v_off[layer]] = vh
    return raw


def segment_side(buf: np.ndarray, layout: Layout, n: int) -> Side:
    """The segments of stores saved before slots (chat format 2): ``[n_layer, n, k_row]`` K then
    ``[n_layer, n, v_row]`` V, V never transposed."""
    k_off = np.arange(layout.n_layer, dtype=np.int64) * n * layout.k_row
    v_off = layout.n_layer * n * layout.k_row + np.arange(layout.n_layer, dtype=np.int64) * n * layout.v_row
    return Side(buf, k_off, v_off, n, False, layout.k_row, layout.v_row)


def slot_side(buf: np.ndarray, layout: Layout, slot_bytes: int) -> Side:
    """The store's slots: one token per ``slot_bytes``, its K rows of every layer then its V rows."""
    k_off = np.arange(layout.n_layer, dtype=np.int64) * layout.k_row
    v_off = layout.n_layer * layout.k_row + np.arange(layout.n_layer, dtype=np.int64) * layout.v_row
    return Side(buf, k_off, v_off, len(buf) // slot_bytes, False, slot_bytes, slot_bytes)


def _load_native() -> ctypes.CDLL | None:
    lib = native.load()
    if lib is None:
        return None
    fn = getattr(lib, "asrkf_copy_rows_strided", None)  # a library built before strides: the NumPy path
    if fn is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn.argtypes = [p, p, p, i64, i64, i64, i32, p, p, p, i64, i64, i64, i32, p, p, i64, i32, i64, i64, i64]
    fn.restype = None
    return lib


T = TypeVar("T")
_lib = _load_native()
_POPULATE_MIN = 1 << 20  # bytes moved from which pre-faulting both buffers pays for the system call
# Threads a large copy is split over, rows apart, and the bytes each must move at least. 400 tokens of the
# LLaMA-3-8B shape (52 MB) from store slots into a blob, 2-core EPYC: 12.7-13.0 GB/s on one thread, 15-20 on two; on
# an H100's 16-core host, 400-token freezes of that shape 43.7-47.4 -> 28.2-29.1 us a token (docs/gpu.md).
_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_PARALLEL_MIN = 4 << 20


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="asrkf-copy")


def split_map(fn: Callable[[int, int], T], n: int, nbytes: int) -> list[T]:
    """``fn(a, b)`` over consecutive parts of ``range(n)``: one part, or one per thread (up to ``_THREADS``) where
    ``nbytes`` (what all of ``n`` moves) gives each at least ``_PARALLEL_MIN``. ``fn`` must let go of the GIL
    (a ctypes call, a hash of a large buffer) for the parts to run side by side."""
    parts = max(1, min(_THREADS, nbytes // _PARALLEL_MIN, n))
    if parts == 1:
        return [fn(0, n)]
    cut = [n * i // parts for i in range(parts + 1)]
    return list(_pool().map(fn, cut[:-1], cut[1:]))


def native_available() -> bool:
    return _lib is not None


def _rows(buf: np.ndarray, off: int, n: int, stride: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """A writable view of ``n`` rows from byte ``off``, ``stride`` bytes apart, each of ``shape``."""
    if n == 0:
        return np.zeros((0, *shape), np.uint8)
    return np.lib.stride_tricks.as_strided(buf[off:], (n, *shape), (stride, *strides))


def k_view(s: Side, layout: Layout, layer: int) -> np.ndarray:
    """K of one layer as [n, k_row] bytes."""
    return _rows(s.buf, int(s.k_off[layer]), s.n, s.k_stride, (layout.k_row,), (1,))


def v_view(s: Side, layout: Layout, layer: int) -> np.ndarray:
    """V of one layer as [n, n_embd_v, v_el] bytes (a strided view when transposed)."""
    el = layout.v_el or layout.v_row
    n_e = layout.v_row // el
    if s.v_trans:
        flat = s.buf[s.v_off[layer] : s.v_off[layer] + s.n * layout.v_row]
        return flat.reshape(n_e, s.n, el).transpose(1, 0, 2)
    return _rows(s.buf, int(s.v_off[layer]), s.n, s.v_stride, (n_e, el), (el, 1))


def _copy_rows_numpy(src: Side, dst: Side, src_rows: np.ndarray, dst_rows: np.ndarray, layout: Layout) -> None:
    for layer in range(layout.n_layer):
        k_view(dst, layout, layer)[dst_rows] = k_view(src, layout, layer)[src_rows]
        v_view(dst, layout, layer)[dst_rows] = v_view(src, layout, layer)[src_rows]


def copy_rows(src: Side, dst: Side, src_rows: np.ndarray, dst_rows: np.ndarray, layout: Layout,
              native: bool | None = None) -> None:
    """Copy K and V of rows ``src_rows`` of ``src`` into rows ``dst_rows`` of ``dst``, every layer."""
    src_rows = np.ascontiguousarray(src_rows, dtype=np.int64)
    dst_rows = np.ascontiguousarray(dst_rows, dtype=np.int64)
    if len(src_rows) != len(dst_rows):
        raise ValueError("row lists differ in length")
    if not dst.buf.flags.writeable:
        raise ValueError("destination is read-only")
    use_native = _lib is not None if native is None else native
    if not use_native:
        _copy_rows_numpy(src, dst, src_rows, dst_rows, layout)
        return
    if _lib is None:
        raise RuntimeError("native KV copy is not built")
    ptr = lambda a: a.ctypes.data  # noqa: E731
    moved = len(src_rows) * layout.bytes_per_cell
    if moved >= _POPULATE_MIN:
        # Only a buffer this call mostly covers: faulting in a whole large buffer per call (a store arena, a 128 MB
        # pinned blob walked 64 times per 1,024-token freeze of the 8B shape when freezes were written 16 tokens a
        # call) took a freeze from 3.65 to 1.16 GB/s on an H200; with this rule 2.84 against 3.23 (docs/gpu.md).
        # Neutral on the CPU (1.62-1.88 GB/s either way, noise).
        if dst.buf.nbytes <= 2 * moved:
            pages.populate(dst.buf, True)
        if src.buf.nbytes <= 2 * moved:
            pages.populate(src.buf, False)
    def run(a: int, b: int) -> None:
        _lib.asrkf_copy_rows_strided(
            ptr(src.buf), ptr(src.k_off), ptr(src.v_off), src.n, src.k_stride, src.v_stride, int(src.v_trans),
            ptr(dst.buf), ptr(dst.k_off), ptr(dst.v_off), dst.n, dst.k_stride, dst.v_stride, int(dst.v_trans),
            ptr(src_rows) + 8 * a, ptr(dst_rows) + 8 * a, b - a,
            layout.n_layer, layout.k_row, layout.v_row, layout.v_el if (src.v_trans or dst.v_trans) else 0,
        )

    split_map(run, len(src_rows), moved)  # ctypes lets go of the GIL: the parts copy side by side
