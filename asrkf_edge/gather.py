"""Rows of scattered KV cells copied out of llama.cpp's cache tensors by one ggml graph on their own device.

llama.cpp's state API copies a sequence's cells with one ``ggml_backend_tensor_get`` per run of consecutive
cells, layer, K and V: on a GPU each is a synchronous transfer, so scattered cells cost one per cell (33 ms for 60
cells of the LLaMA-3-8B shape on an H200). Here every tensor's rows are gathered by ``get_rows`` on a backend of
the tensors' device into one buffer, copied to the host in one transfer. A cache row is read as int32 words, so any
cache type moves as its raw bytes. Graphs are built once per count of cells (rounded up to a power of two; the
extra rows repeat the last cell) and of tensors (the first ``count``) and kept, with their output buffers on the
device: more than ``MAX_CELLS`` cells are gathered in parts, so that those buffers stay small (the LLaMA-3-8B
shape's K and V of 256 cells: 32 MiB) next to the VRAM the frozen cells gave back. The rows come back into one
reused host buffer, page-locked for a GPU: into fresh pageable memory a device-to-host copy ran at 3.6 GB/s on an
H200, into page-locked memory at 41-43 GB/s (docs/gpu.md, second session).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .llama import GgmlInitParams, Reused, Tensor, ggml_lib

_I32 = 26  # GGML_TYPE_I32


@dataclass
class _Graph:
    """The get_rows of every tensor for one count of cells: its context, indices, graph and output buffers."""

    ctx: int
    idx: int
    graph: int
    out: int  # the int32 tensor every get_rows writes its rows into, tensor after tensor
    buffers: tuple[int, int]


class RowGather:
    """Copies the rows of given cells from cache tensors (each ``[row bytes, cells]``, at least ``n_cells`` of them,
    all on one device) to the host."""

    MAX_CELLS = 256

    def __init__(self, tensors: list[int], n_cells: int) -> None:
        if not tensors:
            raise ValueError("no tensors to gather from")
        self._lib = lib = ggml_lib()
        heads = [Tensor.from_address(t) for t in tensors]
        self.rows = [int(h.nb[1]) for h in heads]
        self._cells = [int(h.ne[1]) for h in heads]
        if any(r % 4 for r in self.rows) or min(self._cells) < n_cells or any(h.ne[2] != 1 for h in heads):
            raise ValueError("cache rows that are not whole int32 words, or not one stream of cells")
        dev = lib.ggml_backend_buft_get_device(lib.ggml_backend_buffer_get_type(heads[0].buffer))
        dev = dev or lib.ggml_backend_dev_by_type(0)  # host buffers have no device of their own: the CPU's
        self.device = (lib.ggml_backend_dev_name(dev) or b"?").decode()
        self._backend = lib.ggml_backend_dev_init(dev, None)
        if not self._backend:
            raise ValueError(f"no ggml backend for {self.device}")
        self._tensors, self._n_cells = tensors, n_cells
        self._host = Reused(pinned=self.device != "CPU")
        self._graphs: dict[tuple[int, int], _Graph] = {}

    def __call__(self, cells: np.ndarray, count: int | None = None) -> np.ndarray:
        """The first ``count`` tensors' (default all) rows of ``cells`` as one array, uint8 [count, len(cells), row
        bytes], rows in the order of ``cells`` (a view of :meth:`gather`'s buffer); those tensors' rows must be as
        long. One array, so that a caller copies every layer at once: the key mirror took 8 newest tokens of 32
        layers one layer at a time in 227 us, at once in 9 (2-core EPYC). ValueError where the device cannot run the
        gather (found when a first graph is built) or it failed."""
        count = len(self.rows) if count is None else count
        r, n = self.rows[0], len(cells)
        if any(x != r for x in self.rows[:count]):
            raise ValueError("tensors whose rows differ in length")
        flat, offsets = self.gather(cells, count)
        if n == 0:
            return np.zeros((count, 0, r), np.uint8)
        per = int(offsets[1]) // r if count > 1 else n  # rows each tensor has in the buffer (padded up to a power of 2)
        return flat[: count * per * r].reshape(count, per, r)[:, :n]

    def split(self, flat: np.ndarray, offsets: np.ndarray, n: int) -> list[np.ndarray]:
        """Each tensor's ``n`` rows (uint8 [n, row bytes]) inside a buffer :meth:`gather` returned."""
        return [flat[o : o + n * r].reshape(n, r) for o, r in zip(offsets, self.rows, strict=False)]

    def gather(self, cells: np.ndarray, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``count`` tensors' rows of ``cells`` in one buffer: each tensor's rows, in the order of
        ``cells``, from its byte offset (int64 [count]); rows are contiguous within a tensor. Up to ``MAX_CELLS``
        cells the buffer is the reused one: valid until the next gather."""
        count = len(self.rows) if count is None else count
        n = len(cells)
        if n > self.MAX_CELLS:
            flat = np.empty(n * sum(self.rows[:count]), np.uint8)
            offsets = np.cumsum([0, *(n * r for r in self.rows[: count - 1])]).astype(np.int64)
            for a in range(0, n, self.MAX_CELLS):
                b = min(n, a + self.MAX_CELLS)
                part = self.split(*self.gather(cells[a:b], count), b - a)
                for o, rows, r in zip(offsets, part, self.rows, strict=False):
                    flat[o + a * r : o + b * r] = rows.reshape(-1)
                del part  # the reused buffer serves the next part only once no view of it is left
            return flat, offsets
        size = 1 << max(0, n - 1).bit_length()
        offsets = np.cumsum([0, *(size * r for r in self.rows[: count - 1])]).astype(np.int64)
        if n == 0:
            return np.zeros(0, np.uint8), offsets
        g = self._graphs.get((size, count)) or self._graphs.setdefault((size, count), self._build(size, count))
        idx = np.full(size, cells[-1], np.int32)
        idx[:n] = cells
        if idx.min() < 0 or idx.max() >= self._n_cells:
            raise IndexError("a cell outside the cache")
        lib = self._lib
        lib.ggml_backend_tensor_set(g.idx, idx.ctypes.data, 0, idx.nbytes)
        if lib.ggml_backend_graph_compute(self._backend, g.graph) != 0:
            raise ValueError(f"the gather of {n} cells failed on {self.device}")
        flat = self._host.get(size * sum(self.rows[:count]))
        lib.ggml_backend_tensor_get(g.out, flat.ctypes.data, 0, flat.nbytes)
        return flat, offsets

    def _build(self, size: int, count: int) -> _Graph:
        lib = self._lib
        per = lib.ggml_tensor_overhead()
        ctx = lib.ggml_init(GgmlInitParams((3 * count + 4) * per + lib.ggml_graph_overhead(), None, True))
        out = lib.ggml_new_tensor_1d(ctx, _I32, size * sum(self.rows[:count]) // 4)
        out_buf = lib.ggml_backend_alloc_ctx_tensors(ctx, self._backend)  # only ``out`` so far
        try:
            if not out_buf:
                raise ValueError(f"no room for the gather's output on {self.device}")
            base = Tensor.from_address(out).data
            idx = lib.ggml_new_tensor_1d(ctx, _I32, size)
            graph, at = lib.ggml_new_graph(ctx), 0
            for tensor, r, cells in zip(self._tensors[:count], self.rows, self._cells, strict=False):
                cache = Tensor.from_address(tensor)
                src = lib.ggml_new_tensor_2d(ctx, _I32, r // 4, cells)  # the cache's rows as int32 words
                rows = lib.ggml_get_rows(ctx, src, idx)
                if lib.ggml_backend_tensor_alloc(cache.buffer, src, cache.data) or \
                        lib.ggml_backend_tensor_alloc(Tensor.from_address(out).buffer, rows, base + at):
                    raise ValueError("could not place the gather's tensors")
                if not lib.ggml_backend_supports_op(self._backend, rows):
                    raise ValueError(f"{self.device} cannot gather int32 rows")
                lib.ggml_build_forward_expand(graph, rows)
                at += size * r
            idx_buf = lib.ggml_backend_alloc_ctx_tensors(ctx, self._backend)  # the indices
            if not idx_buf:
                raise ValueError(f"no room for the gather's indices on {self.device}")
        except ValueError:
            if out_buf:
                lib.ggml_backend_buffer_free(out_buf)
            lib.ggml_free(ctx)
            raise
        return _Graph(ctx, idx, graph, out, (out_buf, idx_buf))

    def close(self) -> None:
        self._host.drop()
        for g in self._graphs.values():
            for b in g.buffers:
                self._lib.ggml_backend_buffer_free(b)
            self._lib.ggml_free(g.ctx)
        self._graphs.clear()
        if self._backend:
            self._lib.ggml_backend_free(self._backend)
            self._backend = None
