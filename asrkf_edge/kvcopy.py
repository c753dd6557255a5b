"""Copy KV rows between llama.cpp state blobs and store segments: native C when built, NumPy otherwise.

Both paths give identical bytes (tested). ``ASRKF_EDGE_NATIVE=0`` forces the NumPy path.
"""

from __future__ import annotations

import atexit
import ctypes
import os
from dataclasses import dataclass
from functools import cache

import numpy as np

from . import blob as blobfmt
from . import native
from .blob import Layout


@dataclass(frozen=True)
class Side:
    """One buffer holding ``n`` rows of KV: per-layer byte offsets of K rows and of V, and V's layout."""

    buf: np.ndarray  # uint8, flat
    k_off: np.ndarray  # int64 [n_layer]
    v_off: np.ndarray  # int64 [n_layer]
    n: int
    v_trans: bool


def blob_side(buf: np.ndarray, layout: Layout, n: int) -> Side:
    k_off, v_off = layout.offsets(n)
    return Side(buf, k_off, v_off, n, layout.v_trans)


def empty_blob(layout: Layout, pos: np.ndarray, seq: int) -> np.ndarray:
    """A state blob with cells at ``pos`` for sequence ``seq`` and zero K/V (all headers filled in)."""
    n = len(pos)
    raw = np.zeros(layout.blob_size(n), dtype=np.uint8)
    hdr = blobfmt.header(layout, pos, seq)
    raw[: len(hdr)] = np.frombuffer(hdr, np.uint8)
    side = blob_side(raw, layout, n)
    kh, vh = np.frombuffer(blobfmt.k_header(layout), np.uint8), np.frombuffer(blobfmt.v_header(layout), np.uint8)
    for layer in range(layout.n_layer):
        raw[side.k_off[layer] - 12 : side.k_off[layer]] = kh
        raw[side.v_off[layer] - 12 : side.v_off[layer]] = vh
    return raw


def segment_side(buf: np.ndarray, layout: Layout, n: int) -> Side:
    """Store segments hold ``[n_layer, n, k_row]`` K then ``[n_layer, n, v_row]`` V, V never transposed."""
    k_off = np.arange(layout.n_layer, dtype=np.int64) * n * layout.k_row
    v_off = layout.n_layer * n * layout.k_row + np.arange(layout.n_layer, dtype=np.int64) * n * layout.v_row
    return Side(buf, k_off, v_off, n, False)


def _load_native() -> ctypes.CDLL | None:
    lib = native.load()
    if lib is None:
        return None
    fn = lib.asrkf_copy_rows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, i64, ctypes.c_int32, p, p, p, i64, ctypes.c_int32, p, p, i64,
                   ctypes.c_int32, i64, i64, i64]
    fn.restype = None
    pop = getattr(lib, "asrkf_populate", None)  # absent from a library built before it existed
    if pop is not None:
        pop.argtypes, pop.restype = [p, i64, ctypes.c_int32], ctypes.c_int32
    return lib


_lib = _load_native()
_POPULATE_MIN = 1 << 20  # bytes moved from which pre-faulting both buffers pays for the system call


def native_available() -> bool:
    return _lib is not None


def _v_view(s: Side, layout: Layout, layer: int) -> np.ndarray:
    """V of one layer as [n, n_embd_v, v_el] bytes (a strided view when transposed)."""
    el = layout.v_el or layout.v_row
    n_e = layout.v_row // el
    flat = s.buf[s.v_off[layer] : s.v_off[layer] + s.n * layout.v_row]
    if s.v_trans:
        return flat.reshape(n_e, s.n, el).transpose(1, 0, 2)
    return flat.reshape(s.n, n_e, el)


def _copy_rows_numpy(src: Side, dst: Side, src_rows: np.ndarray, dst_rows: np.ndarray, layout: Layout) -> None:
    kr = layout.k_row
    for layer in range(layout.n_layer):
        sk = src.buf[src.k_off[layer] : src.k_off[layer] + src.n * kr].reshape(src.n, kr)
        dk = dst.buf[dst.k_off[layer] : dst.k_off[layer] + dst.n * kr].reshape(dst.n, kr)
        dk[dst_rows] = sk[src_rows]
        _v_view(dst, layout, layer)[dst_rows] = _v_view(src, layout, layer)[src_rows]


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
    if len(src_rows) * layout.bytes_per_cell >= _POPULATE_MIN and hasattr(_lib, "asrkf_populate"):
        _lib.asrkf_populate(ptr(dst.buf), dst.buf.nbytes, 1)
        _lib.asrkf_populate(ptr(src.buf), src.buf.nbytes, 0)
    _lib.asrkf_copy_rows(
        ptr(src.buf), ptr(src.k_off), ptr(src.v_off), src.n, int(src.v_trans),
        ptr(dst.buf), ptr(dst.k_off), ptr(dst.v_off), dst.n, int(dst.v_trans),
        ptr(src_rows), ptr(dst_rows), len(src_rows),
        layout.n_layer, layout.k_row, layout.v_row, layout.v_el if (src.v_trans or dst.v_trans) else 0,
    )


# Host staging memory for llama.cpp's state copies. A device-to-host copy into ordinary (pageable) memory
# goes through the driver's bounce buffer and first-touch page faults; one into page-locked memory is a
# single DMA. ggml's host buffer type of a GPU device (cudaMallocHost on CUDA) gives such memory.

_exiting = False


@atexit.register
def _mark_exit() -> None:  # the CUDA runtime may be going away: leak pinned buffers instead of freeing
    global _exiting
    _exiting = True


@cache
def _ggml() -> ctypes.CDLL:
    from llama_cpp import _ggml as ggml_bindings

    lib = ggml_bindings.libggml
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, args, res in [
        ("ggml_backend_dev_count", [], sz), ("ggml_backend_dev_get", [sz], vp), ("ggml_backend_dev_type", [vp], ctypes.c_int),
        ("ggml_backend_dev_name", [vp], ctypes.c_char_p), ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_host_buffer_type", [vp], vp),
        ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        ("ggml_backend_buft_alloc_buffer", [vp, sz], vp), ("ggml_backend_buffer_get_base", [vp], vp),
        ("ggml_backend_buffer_free", [vp], None),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


_GPU_TYPES = (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


def gpu_devices() -> list[int]:
    """Raw ``ggml_backend_dev_t`` handles of the GPU devices llama.cpp was built with (none on a CPU build)."""
    lib = _ggml()
    devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    return [d for d in devs if lib.ggml_backend_dev_type(d) in _GPU_TYPES]


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a device's memory, as its backend reports them."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _ggml().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def gpu_names() -> list[str]:
    """Each GPU device as its backend describes it (e.g. "NVIDIA H200"); none on a CPU build."""
    return [_ggml().ggml_backend_dev_description(d).decode() for d in gpu_devices()]


def gpu_memory_used() -> int:
    """Bytes in use on all GPU devices (total minus free, the driver's context included); 0 without one."""
    return sum(total - free for free, total in map(device_memory, gpu_devices()))


def host_array(nbytes: int, pinned: bool) -> np.ndarray:
    """A uint8 array of ``nbytes``: page-locked through the first GPU's host buffer type when ``pinned`` and
    one exists, else ordinary memory. Pinned memory is given back when the array and its views are gone."""
    buft = None
    if pinned and pinned_available():
        lib = _ggml()
        buft = lib.ggml_backend_dev_host_buffer_type(gpu_devices()[0])
    if not buft:
        return np.empty(nbytes, np.uint8)
    buf = lib.ggml_backend_buft_alloc_buffer(buft, nbytes)
    if not buf:
        return np.empty(nbytes, np.uint8)
    raw = (ctypes.c_uint8 * nbytes).from_address(lib.ggml_backend_buffer_get_base(buf))
    raw.owner = _Free(buf)  # frees the ggml buffer when the ctypes object (the array's base) dies
    return np.frombuffer(raw, np.uint8)


class _Free:
    def __init__(self, buf: int) -> None:
        self.buf = buf

    def __del__(self) -> None:
        if not _exiting:
            _ggml().ggml_backend_buffer_free(self.buf)


@cache
def pinned_available() -> bool:
    """True when llama.cpp has a GPU whose backend offers page-locked host buffers (and staging is not off)."""
    if os.environ.get("ASRKF_EDGE_PINNED", "1") == "0":
        return False
    try:
        devs = gpu_devices()
    except (OSError, AttributeError, ImportError):
        return False
    return bool(devs) and bool(_ggml().ggml_backend_dev_host_buffer_type(devs[0]))
