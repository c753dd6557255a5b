"""Attention capture from inside llama.cpp's graph (``cb_eval``): probabilities, queries and keys.

For each enabled layer it copies, after every decode, the rows of the newest tokens of:
``kq_soft_max-<il>`` (attention probabilities over KV *cells*, flash attention off only), post-RoPE
``Qcur-<il>`` (the last ``window`` queries) and post-RoPE ``Kcur-<il>`` (every new key). The callback
is native C (``native/capture.c``) when built, else a Python twin that copies the same bytes.

In split mode (:attr:`Capture.split`) only the queries of ``split_layers`` are asked for, on every decode
whether copied or not: each node asked for ends a graph view, and a CUDA backend keeps a graph per view only
while every decode is cut the same way.

On the first decode the callback also notes llama.cpp's K and V cache tensors of every layer (where a ``SET_ROWS``
node writes ``cache_k_l<il>`` or ``cache_v_l<il>``), so that cells can be copied straight from the cache's rows
(:meth:`Capture.cache_tensors`, :mod:`asrkf_edge.gather`).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import llama_cpp.llama_cpp as L  # noqa: N812
import numpy as np

from . import native
from .errors import LlamaError
from .llama import Model, Tensor, TensorHead, ggml_lib

PROBS, QUERIES, KEYS = 0, 1, 2
WANT, SPLIT = 1, 2  # bits of a slot's ``want``: copied when enabled; asked for in split mode
_NAMES = {"kq_soft_max": PROBS, "Qcur": QUERIES, "Kcur": KEYS}


class _State(ctypes.Structure):
    """Mirror of ``asrkf_capture`` in native/capture.c."""

    _fields_ = [("get_name", ctypes.c_void_p), ("tensor_get", ctypes.c_void_p), ("rope_op", ctypes.c_int32),
                ("n_layer", ctypes.c_int32), ("enabled", ctypes.c_int32), ("split", ctypes.c_int32), ("window", ctypes.c_int32),
                ("error", ctypes.c_int32), ("err_slot", ctypes.c_int32), ("want", ctypes.c_void_p),
                ("buf", ctypes.c_void_p), ("cap", ctypes.c_void_p), ("shape", ctypes.c_void_p), ("hits", ctypes.c_void_p),
                ("set_rows_op", ctypes.c_int32), ("find_cache", ctypes.c_int32), ("layout_ok", ctypes.c_int32),
                ("n_found", ctypes.c_int32), ("cache_kv", ctypes.c_void_p), ("recall", ctypes.c_void_p),
                ("recall_user", ctypes.c_void_p), ("recall_ns", ctypes.c_int64)]


RecallFn = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)
"""``recall(layer, tensor, user)``: once a layer's post-RoPE ``Qcur`` is computed, before the layer's attention."""


def _op(lib: ctypes.CDLL, name: bytes) -> int:
    """ggml's number of the op called ``name``; -1 when this ggml has none."""
    for op in range(1, 200):
        if lib.ggml_op_name(op) == name:
            return op
    return -1


def _rope_op(lib: ctypes.CDLL) -> int:
    op = _op(lib, b"ROPE")
    if op < 0:
        raise LlamaError("ggml has no ROPE op; this llama.cpp is not supported")
    return op


@dataclass(frozen=True)
class CaptureSpec:
    """What to copy: which layers, how many of the newest query rows, and which tensors."""

    layers: tuple[int, ...]
    window: int = 32
    probs: bool = True
    queries: bool = True
    keys: bool = True
    prob_layers: tuple[int, ...] | None = None  # layers whose probabilities are copied (None: ``layers``)
    split_layers: tuple[int, ...] = ()  # layers whose queries split mode asks for (a subset of ``layers``)


class Capture:
    """Owns the callback and its buffers; read the copies after each decode, then :meth:`reset`."""

    def __init__(self, model: Model, spec: CaptureSpec, n_cells: int, n_batch: int, use_native: bool | None = None) -> None:
        self.spec = spec
        self.n_layer = nl = model.n_layer
        self.n_head, self.n_head_kv, self.head_dim = model.n_head, model.n_head_kv, model.head_dim
        cells = -(-n_cells // 256) * 256  # llama.cpp pads the attended range to 256 cells
        sizes = {PROBS: self.n_head * spec.window * cells * 4, QUERIES: spec.window * self.n_head * self.head_dim * 4,
                 KEYS: n_batch * self.n_head_kv * self.head_dim * 4}
        enabled = {PROBS: spec.probs, QUERIES: spec.queries, KEYS: spec.keys}
        self._want = np.zeros(3 * nl, np.uint8)
        self._cap = np.zeros(3 * nl, np.int64)
        self._shape = np.zeros(3 * nl * 3, np.int64)
        self._hits = np.zeros(3 * nl, np.int32)
        self._bufs: dict[int, np.ndarray] = {}
        self._ptrs = (ctypes.c_void_p * (3 * nl))()
        for kind, on in enabled.items():
            chosen = spec.prob_layers if kind == PROBS and spec.prob_layers is not None else spec.layers
            for layer in chosen if on else ():
                if not 0 <= layer < nl:
                    raise ValueError(f"layer {layer} out of range: the model has {nl}")
                slot = kind * nl + layer
                self._bufs[slot] = np.zeros(sizes[kind], np.uint8)
                self._want[slot], self._cap[slot] = WANT, sizes[kind]
                self._ptrs[slot] = self._bufs[slot].ctypes.data
        if not set(spec.split_layers) <= set(spec.layers) or (spec.split_layers and not spec.queries):
            raise ValueError("split_layers must be layers whose queries are captured")
        for layer in spec.split_layers:
            self._want[QUERIES * nl + layer] |= SPLIT
        self._lib = ggml_lib()
        st = self._state = _State()
        st.get_name = ctypes.cast(self._lib.ggml_get_name, ctypes.c_void_p)
        st.tensor_get = ctypes.cast(self._lib.ggml_backend_tensor_get, ctypes.c_void_p)
        st.rope_op, st.n_layer, st.enabled, st.window = _rope_op(self._lib), nl, 1, spec.window
        st.want, st.cap = self._want.ctypes.data, self._cap.ctypes.data
        st.shape, st.hits = self._shape.ctypes.data, self._hits.ctypes.data
        st.buf = ctypes.cast(self._ptrs, ctypes.c_void_p)
        self._cache_kv = np.zeros(2 * nl, np.uintp)
        st.set_rows_op, st.find_cache, st.layout_ok = _op(self._lib, b"SET_ROWS"), 1, -1
        st.cache_kv = self._cache_kv.ctypes.data
        self._name_at = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(ctypes.cast(self._lib.ggml_get_name, ctypes.c_void_p).value)
        lib = native.load() if use_native is not False else None
        if use_native and lib is None:
            raise RuntimeError("native capture is not built")
        self.native = lib is not None
        if lib is not None:
            self.callback = ctypes.cast(lib.asrkf_capture_cb, L.ggml_backend_sched_eval_callback)
        else:
            self.callback = L.ggml_backend_sched_eval_callback(self._python_callback)
        self.user_data = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        self._recall: object | None = None  # the ctypes thunk handed to the callback, kept alive here

    def set_recall(self, fn: object | None, user: int = 0) -> None:
        """Hand every layer's post-RoPE queries of each decode to ``fn`` (a :data:`RecallFn`) with ``user``, in graph
        order, while llama.cpp computes the decode; None stops it."""
        self._recall = fn
        self._state.recall = ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None
        self._state.recall_user = user

    def recall_seconds(self) -> float:
        """Seconds spent in the recall callback since the last call."""
        ns, self._state.recall_ns = self._state.recall_ns, 0
        return ns / 1e9

    @property
    def enabled(self) -> bool:
        return bool(self._state.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._state.enabled = int(on)

    @property
    def split(self) -> bool:
        """Ask for the split layers' queries on every decode (copied only while :attr:`enabled`)."""
        return bool(self._state.split)

    @split.setter
    def split(self, on: bool) -> None:
        self._state.split = int(on)

    def reset(self) -> None:
        """Forget the last decode's copies (call before each decode)."""
        self._hits[:] = 0
        self._state.error = 0

    def check(self) -> None:
        """Raise if the last decode's capture failed (buffer too small, unexpected tensor layout)."""
        if self._state.error:
            slot = self._state.err_slot
            what = ["kq_soft_max", "Qcur", "Kcur"][slot // self.n_layer]
            reason = "buffer too small" if self._state.error == 1 else "unexpected tensor type or layout"
            raise LlamaError(f"capturing {what}-{slot % self.n_layer} failed: {reason}")

    def cache_tensors(self) -> list[tuple[int, int, int]] | None:
        """llama.cpp's KV cache tensors, every layer's K then every layer's V, as (tensor, ggml type, bytes per cell
        row), once a decode has shown them; None before, or where this llama.cpp's graph or tensor layout was not
        recognised. (With flash attention off llama.cpp stores V transposed: its rows are then not cells.)"""
        if self._state.n_found < 2 * self.n_layer:
            return None
        heads = [TensorHead.from_address(int(t)) for t in self._cache_kv]
        return [(int(t), h.type, int(h.nb[1])) for t, h in zip(self._cache_kv, heads, strict=True)]

    def _get(self, kind: int, layer: int) -> np.ndarray | None:
        slot = kind * self.n_layer + layer
        if not self._hits[slot]:
            return None
        shape = tuple(int(x) for x in self._shape[3 * slot : 3 * slot + 3])
        return self._bufs[slot][: 4 * shape[0] * shape[1] * shape[2]].view(np.float32).reshape(shape)

    def probs(self, layer: int) -> np.ndarray | None:
        """Attention probabilities of the last decode, [n_head, rows, n_kv cells], or None."""
        return self._get(PROBS, layer)

    def queries(self, layer: int) -> np.ndarray | None:
        """Post-RoPE queries of the newest ``rows`` tokens, [rows, n_head, head_dim], or None."""
        return self._get(QUERIES, layer)

    def keys(self, layer: int) -> np.ndarray | None:
        """Post-RoPE keys of every token of the last decode, [n_tokens, n_head_kv, head_dim], or None."""
        return self._get(KEYS, layer)

    # the Python twin of asrkf_capture_cb
    def _python_callback(self, tensor: int, ask: bool, _user: int) -> bool:
        st = self._state
        if ask and st.find_cache and TensorHead.from_address(tensor).op == st.set_rows_op:
            self._find_cache(tensor)
        if not st.enabled and not st.split and not st.recall:
            return False
        head = TensorHead.from_address(tensor)
        kind, parsed = self._parse(tensor)  # once for both uses
        layer = self._recall_layer(head, kind, parsed) if st.recall else -1
        if not st.enabled and not st.split and layer < 0:
            return False
        slot = self._slot(head, kind, parsed) if st.enabled or st.split else -1
        if ask:
            return slot >= 0 or layer >= 0
        if slot >= 0 and st.enabled:
            self._copy(tensor, head, slot)
        if layer >= 0:
            assert self._recall is not None
            t0 = time.perf_counter_ns()
            self._recall(layer, tensor, st.recall_user)  # type: ignore[operator]
            st.recall_ns += time.perf_counter_ns() - t0
        return True

    def _parse(self, tensor: int) -> tuple[int, int]:
        """C's parse: (kind, layer) of a node named ``<kind>-<layer>``, or (-1, -1)."""
        name = (self._lib.ggml_get_name(tensor) or b"").decode("ascii", "replace")
        base, _, idx = name.rpartition("-")
        kind = _NAMES.get(base)
        if kind is None or not idx[:1].isdigit():
            return -1, -1
        layer = _atoi(idx)
        return (kind, layer) if layer < self.n_layer else (-1, -1)

    def _recall_layer(self, head: TensorHead, kind: int, layer: int) -> int:
        """C's recall_layer: the layer whose post-RoPE Qcur a node parsed as (kind, layer) is, else -1."""
        return layer if kind == QUERIES and head.op == self._state.rope_op else -1

    def _find_cache(self, tensor: int) -> None:
        st = self._state
        if st.layout_ok < 0:
            st.layout_ok = int(self._name_at(tensor) == tensor + Tensor.name.offset)
        if not st.layout_ok:
            st.find_cache = 0
            return
        dst = Tensor.from_address(tensor).view_src  # a SET_ROWS node is a view of the tensor it writes
        if not dst or Tensor.from_address(dst).view_src:
            return
        slot = _cache_slot(Tensor.from_address(dst).name, self.n_layer)
        if slot >= 0 and not self._cache_kv[slot]:
            self._cache_kv[slot] = dst
            st.n_found += 1
            if st.n_found == 2 * self.n_layer:
                st.find_cache = 0

    def _slot(self, head: TensorHead, kind: int, layer: int) -> int:
        """C's slot_of: the capture slot of a node parsed as (kind, layer), else -1."""
        if kind < 0 or (kind != PROBS and head.op != self._state.rope_op):
            return -1
        slot = kind * self.n_layer + layer
        return slot if self._want[slot] & (SPLIT if self._state.split else WANT) else -1

    def _copy(self, tensor: int, head: TensorHead, slot: int) -> None:
        st = self._state
        ne, nb = list(head.ne), list(head.nb)
        if head.type != 0 or nb[0] != 4 or nb[1] != 4 * ne[0] or nb[2] != nb[1] * ne[1]:
            self._fail(2, slot)
            return
        dst = self._bufs[slot].ctypes.data
        get = self._lib.ggml_backend_tensor_get
        shape = self._shape[3 * slot : 3 * slot + 3]
        if slot // self.n_layer == PROBS:
            rows = min(ne[1], st.window)
            part = rows * nb[1]
            if part * ne[2] > self._cap[slot]:
                self._fail(1, slot)
                return
            for h in range(ne[2]):
                get(tensor, dst + h * part, h * nb[2] + (ne[1] - rows) * nb[1], part)
            shape[:] = (ne[2], rows, ne[0])
        else:
            rows = ne[2] if (slot // self.n_layer == KEYS or ne[2] < st.window) else st.window
            size = rows * nb[2]
            if size > self._cap[slot]:
                self._fail(1, slot)
                return
            get(tensor, dst, (ne[2] - rows) * nb[2], size)
            shape[:] = (rows, ne[1], ne[0])
        self._hits[slot] += 1

    def _fail(self, err: int, slot: int) -> None:
        if not self._state.error:
            self._state.error, self._state.err_slot = err, slot


def _cache_slot(name: bytes, n_layer: int) -> int:
    """C's cache_slot: layer for ``cache_k_l<layer>``, n_layer + layer for ``cache_v_l<layer>``, else -1."""
    if name[:6] != b"cache_" or name[6:7] not in (b"k", b"v") or name[7:9] != b"_l" or not name[9:].isdigit():
        return -1
    layer = int(name[9:])
    return -1 if layer >= n_layer else (n_layer if name[6:7] == b"v" else 0) + layer


def _atoi(text: str) -> int:
    """C's atoi on a string that starts with a digit: the leading digits."""
    digits = len(text) - len(text.lstrip("0123456789"))
    return int(text[:digits])
