"""Recall inside llama.cpp's graph: frozen tokens back in the one layer whose query wants them, for one decode.

The active set is shared by every layer and chosen from older queries; each layer of each new token reads
something else. Once a layer's post-RoPE queries of a decode are computed (the capture's callback,
:meth:`Capture.set_recall`), the frozen tokens they give the most attention (exact softmax over the key mirror,
frozen and active keys together) take, in that layer's K and V only, the cells of the active tokens they give the
least, where they would get more; after the decode, those cells get their own rows back (a layer's K and V are
read by that layer's attention only). No cell changes position or sequence, so llama.cpp, the cell map and the
store see nothing of it: a cell's position only enters the causal mask, which every frozen token, older than the
decode, passes, and a K row carries its own RoPE rotation.

Measured before it was built (a scratch harness: the bench's text, 2,000 tokens read whole, 128 forced tokens,
budget 0.35, streaming's set plus 32 per-layer recalled tokens; mean KL divergence from full): 0.0867 -> 0.0115
(16 tokens: 0.0156; recalled in every second layer only: 0.0352; pages of 8 scored by their mean key: 0.0585).

CPU caches only: rows are written through the cache tensors' host memory.

A layer's work runs in one Numba C callback (:func:`_callback`) that the capture's callback calls straight from
llama.cpp's graph with the layer's query tensor and a table of addresses (:class:`Recall`'s registers, filled in by
:meth:`Recall.arm`): no Python frame, no GIL, no array objects made per layer. Through a Python callback (ctypes,
NumPy views, three kernel dispatches) a layer took about 110 us at 512 tokens for perhaps 20 us of work: decode
with recall at 0.64x full's speed there (84-86 against 132 tok/s, 2-core EPYC).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import TYPE_CHECKING

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .capture import RecallFn
from .errors import LlamaError
from .importance import Importance, layer_mass, layer_mass_into, pick_swaps
from .llama import Tensor, ggml_lib

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

# The callback's registers (int64): flags, counts, and the addresses of the arrays :meth:`Recall.arm` fills in
# (FLOATS: the softmax scale and the swap ratio, float32).
(ARMED, ERROR, ROWS, N_ROWS, QPOS, MIRROR, MIRROR_L, MIRROR_P, N_KV, HEAD_DIM, KPOS, N, NF, FLOATS, WORK, MASS, TOP,
 LOW, SIZE, CELLS, SIDE_OF, SLOT_OF, SIDES, N_SIDES, LAYERS, N_LAYER, K_ROW, V_ROW, V_EL, V_TRANS, SAVED_N,
 SAVED_CELLS, SAVED_K, SAVED_V, T_NE, T_NB, T_DATA, SCORED, STRIDE, N_REGS) = range(40)
# Columns of the per-layer table (LAYERS): the cache's K data, its bytes from cell to cell, the V data, the cells,
# the mirror's layer (-1: not mirrored, no recall), and the query heads the layer's Qcur must have.
K_DATA, K_STRIDE, V_DATA, CELLS_OF, MIRROR_OF, HEADS_OF, N_COLS = range(7)
# Query rows scored at a time: a chunk's logits over every key, all at once, took 2 x rows x heads x keys floats
# (147 MB for 512 rows over 4,000 keys of the default model) and more time: 256 rows over 3,000 keys of one layer
# 32.9 ms at once, 25.9 in blocks of 32, 25.5 of 64, 27.8 of 128 (a microbench, 2-core Xeon).
ROW_BLOCK = 32
# Columns of the store's sides (SIDES): the base, K's and V's bytes from slot to slot, then per layer the offset of K,
# then of V.
SIDE_BASE, SIDE_K_STRIDE, SIDE_V_STRIDE, SIDE_K_OFF = range(4)


@intrinsic
def _address(typingctx, addr):  # noqa: ANN001, ANN202 - Numba's intrinsic protocol
    """An int64 address as a pointer that ``numba.carray`` takes."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
    return types.voidptr(types.int64), codegen


_JIT = {"cache": True, "nogil": True}


@numba.njit(**_JIT)
def _bytes(addr: int, n: int) -> np.ndarray:
    return numba.carray(_address(addr), (n,), np.uint8)


@numba.njit(**_JIT)
def _ints(addr: int, n: int) -> np.ndarray:
    return numba.carray(_address(addr), (n,), np.int64)


@numba.njit(**_JIT)
def _copy(dst: int, src: int, n: int) -> None:
    """``n`` bytes from ``src`` to ``dst`` (an explicit loop: LLVM makes it a memcpy; a slice assignment of Numba
    arrays checks for overlap and copies element by element, 96 against 3 ns for 384 bytes)."""
    d, s = _bytes(dst, n), _bytes(src, n)
    for j in range(n):
        d[j] = s[j]


@numba.njit(**_JIT)
def _v_columns(r: np.ndarray, table: np.ndarray, layer: int, cells: np.ndarray, k: int, saved_v: int, src: np.ndarray) -> None:
    """V of ``k`` cells of one layer where V is transposed (flash attention off: [n_e, cells] elements): each cell's
    own V into rows of ``saved_v`` and, with ``src`` (rows [k, v_row]), ``src``'s V written over it; without
    ``src`` (empty), the saved rows put back. One element of every cell at a time: a cell's elements lie a whole
    row of cells apart, so cell by cell a layer's V (300 KB at 800 cells of the default model) went through L2 for
    every cell; this way the k cells' columns and rows stay in L1. Measured (2-core Xeon, default model, 2k tokens
    read into 700 cells, 4,400 rows lent a token): the layers' callbacks 12.5 -> 8.4 ms a token, their restore 4.1 ->
    1.9, the token 30.8 -> 23.9 ms (asrkf's 13.8; with flash attention 6.0 and 0.7 ms)."""
    v_row, n_cells = r[V_ROW], table[layer, CELLS_OF]
    n_e = v_row // 2  # 2-byte elements (f16, bf16): _layer_table allows no other transposed V
    _columns(_bytes(table[layer, V_DATA], n_e * n_cells * 2).view(np.uint16), _bytes(saved_v, k * v_row).view(np.uint16),
             src.reshape(-1).view(np.uint16), cells, n_cells, k, n_e, len(src) > 0)


@numba.njit(**_JIT)
def _columns(cache: np.ndarray, saved: np.ndarray, src: np.ndarray, cells: np.ndarray, n_cells: int, k: int, n_e: int,
             put: bool) -> None:
    """:func:`_v_columns` in elements of one type: ``cache`` [n_e * n_cells], ``saved`` and ``src`` [k * n_e]."""
    for e in range(n_e):
        row = e * n_cells
        if put:
            for i in range(k):
                saved[i * n_e + e] = cache[row + cells[i]]
                cache[row + cells[i]] = src[i * n_e + e]
        else:
            for i in range(k):
                cache[row + cells[i]] = saved[i * n_e + e]


@numba.njit(**_JIT)
def _cell_rows(r: np.ndarray, table: np.ndarray, layer: int, cell: int) -> tuple[int, int]:
    """Where a cell's K row and (V not transposed) V row lie in one layer's cache."""
    return table[layer, K_DATA] + cell * table[layer, K_STRIDE], table[layer, V_DATA] + cell * r[V_ROW]


@numba.njit(**_JIT)
def _lend(layer: int, tensor: object, r: np.ndarray) -> None:
    """One layer's recall: its queries' masses over frozen then active keys, the gaining swaps, the cells' own rows
    saved, the frozen rows written over them."""
    n_layer, nf, n = r[N_LAYER], r[NF], r[N]
    table = _ints(r[LAYERS], n_layer * N_COLS).reshape((n_layer, N_COLS))
    mirror_layer = table[layer, MIRROR_OF]
    if mirror_layer < 0 or nf == 0 or n == nf:
        return
    head = numba.carray(tensor, (r[T_DATA] + 1,), np.int64)  # the tensor's leading fields (a void pointer)
    d, h, rows = head[r[T_NE]], head[r[T_NE] + 1], head[r[T_NE] + 2]
    nb0, nb1, nb2 = head[r[T_NB]], head[r[T_NB] + 1], head[r[T_NB] + 2]
    f32 = numba.carray(tensor, (1,), np.int32)[0] == 0  # GGML_TYPE_F32
    if not f32 or nb0 != 4 or nb1 != 4 * d or nb2 != nb1 * h or rows != r[N_ROWS] or h != table[layer, HEADS_OF] \
            or d != r[HEAD_DIM]:
        r[ERROR] = layer + 1
        return
    q = numba.carray(_address(head[r[T_DATA]]), (rows, h, d), np.float32)
    qpos, kpos = _ints(r[QPOS], rows), _ints(r[KPOS], n)
    keys = numba.carray(_address(r[MIRROR]), (r[MIRROR_L], r[MIRROR_P], r[N_KV], d), np.uint16)
    mass = numba.carray(_address(r[MASS]), (n,), np.float32)
    mass[:] = 0.0
    work = numba.carray(_address(r[WORK]), (min(r[SCORED], ROW_BLOCK) * h * n,), np.float32)
    scale, ratio = numba.carray(_address(r[FLOATS]), (2,), np.float32)
    first = rows - 1 - (r[SCORED] - 1) * r[STRIDE]  # the rows that choose: all of a short decode's, some of a chunk's
    qs, qp = q[first :: r[STRIDE]], qpos[first :: r[STRIDE]]
    for b in range(0, r[SCORED], ROW_BLOCK):
        layer_mass_into(qs[b : b + ROW_BLOCK], qp[b : b + ROW_BLOCK], keys, mirror_layer, kpos, scale, work, mass)
    size = r[SIZE]
    top, low = _ints(r[TOP], size), _ints(r[LOW], size)
    k = pick_swaps(mass, nf, size, top, low, ratio)
    if k == 0:
        return
    k_row, v_row = r[K_ROW], r[V_ROW]
    cells, side_of, slot_of = _ints(r[CELLS], n - nf), _ints(r[SIDE_OF], nf), _ints(r[SLOT_OF], nf)
    width = SIDE_K_OFF + 2 * n_layer
    sides = _ints(r[SIDES], r[N_SIDES] * width).reshape((r[N_SIDES], width))
    saved_cells = _ints(r[SAVED_CELLS], n_layer * size).reshape((n_layer, size))
    saved_k, saved_v = r[SAVED_K] + layer * size * k_row, r[SAVED_V] + layer * size * v_row
    columns = np.empty((k if r[V_TRANS] else 0, v_row), np.uint8)  # the frozen V rows, for _v_columns
    for i in range(k):
        cell, side, slot = cells[low[i]], sides[side_of[top[i]]], slot_of[top[i]]
        saved_cells[layer, i] = cell
        k_at, v_at = _cell_rows(r, table, layer, cell)
        src_v = side[SIDE_BASE] + side[SIDE_K_OFF + n_layer + layer] + slot * side[SIDE_V_STRIDE]
        _copy(saved_k + i * k_row, k_at, k_row)
        _copy(k_at, side[SIDE_BASE] + side[SIDE_K_OFF + layer] + slot * side[SIDE_K_STRIDE], k_row)
        if r[V_TRANS]:
            _copy(columns[i].ctypes.data, src_v, v_row)
        else:
            _copy(saved_v + i * v_row, v_at, v_row)
            _copy(v_at, src_v, v_row)
    if r[V_TRANS]:
        _v_columns(r, table, layer, saved_cells[layer], k, saved_v, columns)
    _ints(r[SAVED_N], n_layer)[layer] = k
    r[ROWS] += k


@numba.njit(**_JIT)
def _restore(r: np.ndarray) -> None:
    """Every lent cell's own K and V back, every layer."""
    n_layer, size, k_row, v_row = r[N_LAYER], r[SIZE], r[K_ROW], r[V_ROW]
    table = _ints(r[LAYERS], n_layer * N_COLS).reshape((n_layer, N_COLS))
    saved_n = _ints(r[SAVED_N], n_layer)
    saved_cells = _ints(r[SAVED_CELLS], n_layer * size).reshape((n_layer, size))
    none = np.empty((0, v_row), np.uint8)
    for layer in range(n_layer):
        saved_k, saved_v, k = r[SAVED_K] + layer * size * k_row, r[SAVED_V] + layer * size * v_row, saved_n[layer]
        for i in range(k):
            k_at, v_at = _cell_rows(r, table, layer, saved_cells[layer, i])
            _copy(k_at, saved_k + i * k_row, k_row)
            if not r[V_TRANS]:
                _copy(v_at, saved_v + i * v_row, v_row)
        if r[V_TRANS] and k:
            _v_columns(r, table, layer, saved_cells[layer], k, saved_v, none)
        saved_n[layer] = 0


@cache
def _callback() -> RecallFn:
    """The C callback (compiled on first use, then cached by Numba): ``(layer, Qcur tensor, registers)``."""
    # Numba's thread pool up first: code of a parallel kernel loaded from Numba's cache into a process that has not
    # started it fails to link ("Symbol not found: allocate_sched"); a call of the Python-facing kernel starts it.
    layer_mass(np.zeros((1, 1, 1), np.float32), np.zeros(1, np.int64), np.zeros((1, 1, 1, 1), np.uint16), 0,
               np.zeros(1, np.int64), 1.0)
    @numba.cfunc(types.void(types.int32, types.voidptr, types.voidptr), cache=True, nogil=True)
    def on_layer(layer, tensor, regs):  # noqa: ANN001, ANN202
        r = numba.carray(regs, (N_REGS,), np.int64)
        if r[ARMED] and not r[ERROR]:
            _lend(layer, tensor, r)
    return RecallFn(on_layer.address)


class Recall:
    """Per-layer recall of up to ``size`` frozen tokens in the decodes of at most ``max_rows`` tokens (none: 0), each
    query row choosing; with ``prompt_rows``, in longer decodes (a prompt's chunks) too: up to ``prompt_size`` tokens a layer
    (``size`` when 0), chosen by that many of the chunk's query rows spread over it, in the chunks that start within
    the newest ``prompt_tail`` tokens of a prompt (0: every chunk); with ``reply`` (and ``size`` 0), in the short
    decodes of the ``reply`` positions after a prompt's last chunk (a reply's first tokens), up to ``reply_size`` a
    layer. A frozen token takes an active token's cell where it gets more than ``ratio`` times that token's attention."""

    def __init__(self, session: Session, importance: Importance, size: int, max_rows: int = 8, prompt_rows: int = 0,
                 ratio: float = 1.0, prompt_size: int = 0, prompt_tail: int = 0, reply: int = 0, reply_size: int = 0) -> None:
        if size < 0 or (size == 0 and not (prompt_rows and prompt_size) and not (reply and reply_size)):
            raise ValueError(f"recall size must be >= 1, or 0 with prompt rows and size or a reply and its size, got {size}")
        if min(prompt_rows, prompt_size, prompt_tail, reply, reply_size) < 0 or not ratio >= 1:
            raise ValueError("recall's prompt rows, size and tail, reply and reply size must be >= 0 and the ratio >= 1, "
                             f"got {prompt_rows}, {prompt_size}, {prompt_tail}, {reply}, {reply_size}, {ratio}")
        self.session, self.importance, self.size, self.max_rows = session, importance, size, max_rows
        self.prompt_rows, self.ratio = prompt_rows, ratio
        self.prompt_size, self.prompt_tail = prompt_size or size, prompt_tail
        self.reply, self.reply_size = reply, reply_size
        self._reply_end = 0  # short decodes before this position lend ``reply_size`` rows (a reply's first tokens)
        self._frozen_of: tuple[object, int] = (None, -1)  # the store and its changes that the frozen side is of
        self._fn = _callback()
        self._regs = np.zeros(N_REGS, np.int64)
        self._layers: np.ndarray | None = None  # the LAYERS table, once the cache's tensors are known
        self.usable = True  # False once the cache turned out not to be in host memory
        self._keep: dict[str, np.ndarray] = {}  # the arrays the registers point into
        self.seconds = 0.0  # in the layers' callbacks

    @property
    def in_short_decodes(self) -> bool:
        """Whether short decodes may lend rows: every one (``size``) or a reply's first (``reply``)."""
        return bool(self.size or self.reply)

    @property
    def rows(self) -> int:
        """(token, layer) rows recalled so far."""
        return int(self._regs[ROWS])

    def _point(self, reg: int, name: str, a: np.ndarray) -> None:
        """Register ``reg`` to ``a``'s data, ``a`` kept alive."""
        assert a.flags.c_contiguous
        self._keep[name] = a
        self._regs[reg] = a.ctypes.data

    def _layer_table(self) -> np.ndarray | None:
        """LAYERS from llama.cpp's K and V cache tensors (their host memory), or None before they are known."""
        capture = self.session.capture
        tensors = capture.cache_tensors() if capture is not None else None
        if tensors is None:
            return None
        if not all(ggml_lib().ggml_backend_buffer_is_host(Tensor.from_address(t).buffer) for t, _, _ in tensors):
            log.info("the KV cache is not in host memory: no recall")
            self.usable = False
            return None
        layout, model = self.session.store.layout, self.importance.model  # type: ignore[union-attr]
        if layout.v_trans and layout.v_el != 2:
            log.info("a transposed V cache of %d-byte elements: no recall", layout.v_el)
            self.usable = False
            return None
        n_layer = len(tensors) // 2
        index = {layer: i for i, layer in enumerate(self.importance.layers)}
        table = np.zeros((n_layer, N_COLS), np.int64)
        for layer in range(n_layer):
            kt, vt = Tensor.from_address(tensors[layer][0]), Tensor.from_address(tensors[n_layer + layer][0])
            table[layer] = (kt.data, kt.nb[1], vt.data, kt.ne[1], index.get(layer, -1), model.n_head)
        r = self._regs
        r[N_LAYER], r[K_ROW], r[V_ROW] = n_layer, layout.k_row, layout.v_row
        r[V_EL], r[V_TRANS] = layout.v_el or layout.v_row, int(layout.v_trans)
        r[T_NE], r[T_NB], r[T_DATA] = Tensor.ne.offset // 8, Tensor.nb.offset // 8, Tensor.data.offset // 8
        most = max(self.size, self.prompt_size, self.reply_size)  # SIZE, set at each arm, is one of them
        self._point(SAVED_N, "saved_n", np.zeros(n_layer, np.int64))
        self._point(SAVED_CELLS, "saved_cells", np.zeros((n_layer, most), np.int64))
        self._point(SAVED_K, "saved_k", np.zeros((n_layer, most, layout.k_row), np.uint8))
        self._point(SAVED_V, "saved_v", np.zeros((n_layer, most, layout.v_row), np.uint8))
        self._point(TOP, "top", np.zeros(most, np.int64))
        self._point(LOW, "low", np.zeros(most, np.int64))
        self._point(FLOATS, "floats", np.array([self.importance.scale, self.ratio], np.float32))
        self._point(LAYERS, "layers", table)
        return table

    # around a decode (Session.eval)
    def arm(self, pos0: int, n: int, left: int = 0) -> None:
        """Before a decode of ``n`` tokens at ``pos0``, ``left`` more of the same prompt to follow: recall in it when
        something is frozen and it is short (every one, or a reply's first), or a prompt's chunk that recall reads."""
        s, r = self.session, self._regs
        r[ARMED] = 0
        chunk = n > self.max_rows
        if chunk:
            self._reply_end = pos0 + n + self.reply
            size = self.prompt_size if self.prompt_rows and not (self.prompt_tail and left + n > self.prompt_tail) else 0
        else:
            size = self.size or (self.reply_size if pos0 < self._reply_end else 0)
        if not size:
            return  # a decode that lends nothing
        if not s.n_frozen or s.capture is None or not self.usable:
            return
        if self._layers is None:
            self._layers = self._layer_table()
            if self._layers is None:
                return  # the cache's tensors are known after the first decode
        frozen = self._frozen_side()
        cells = s.cells.cells_of(0)
        pos = s.cells.pos[cells]
        imp = self.importance
        known = imp.known
        movable = ~s.protected(pos) & (pos < len(known))
        movable[movable] = known[pos[movable]]  # active tokens whose keys the mirror holds
        mirror = imp.mirror()
        kpos = np.concatenate([frozen, pos[movable]]).astype(np.int64)
        scored = min(n, self.prompt_rows) if chunk else n
        need = min(scored, ROW_BLOCK) * imp.model.n_head * len(kpos)
        work = self._keep.get("work")
        if work is None or len(work) < need:
            work = np.empty(2 * need, np.float32)
        self._point(WORK, "work", work)
        self._point(MASS, "mass", np.empty(len(kpos), np.float32))
        self._point(KPOS, "kpos", kpos)
        self._point(QPOS, "qpos", np.arange(pos0, pos0 + n, dtype=np.int64))
        self._point(CELLS, "cells", np.ascontiguousarray(cells[movable], np.int64))
        self._point(MIRROR, "mirror", mirror)
        r[MIRROR_L], r[MIRROR_P], r[N_KV], r[HEAD_DIM] = mirror.shape
        r[N], r[NF], r[N_ROWS], r[ERROR] = len(kpos), len(frozen), n, 0
        r[SCORED], r[STRIDE] = scored, n // scored
        r[SIZE] = size
        r[ARMED] = 1
        s.capture.set_recall(self._fn, r.ctypes.data)

    def _frozen_side(self) -> np.ndarray:
        """The frozen positions, with the registers that depend on them alone (the store's slots) set again only
        when the frozen set changed: at re-evaluations, every 64 tokens by default, not at every decode (rebuilt
        every decode it cost about 0.1 ms a token at 512 tokens)."""
        s, r, imp = self.session, self._regs, self.importance
        store = s.store
        assert store is not None
        if self._frozen_of[0] is store and self._frozen_of[1] == store.changes:
            return self._keep["frozen"]
        frozen = s.frozen_positions()
        imp.ensure_keys(frozen)
        sides, side_of, slot_of = store.locate(frozen)
        n_layer = int(r[N_LAYER])
        table = np.zeros((len(sides), SIDE_K_OFF + 2 * n_layer), np.int64)
        for i, side in enumerate(sides):
            assert not side.v_trans  # the store's slots hold V as rows
            table[i, :SIDE_K_OFF] = (side.buf.ctypes.data, side.k_stride, side.v_stride)
            table[i, SIDE_K_OFF:] = np.concatenate([side.k_off, side.v_off])
        self._keep["frozen"] = frozen
        self._point(SIDE_OF, "side_of", np.ascontiguousarray(side_of, np.int64))
        self._point(SLOT_OF, "slot_of", np.ascontiguousarray(slot_of, np.int64))
        self._point(SIDES, "sides", table)
        r[N_SIDES] = len(sides)
        self._frozen_of = (store, store.changes)
        return frozen

    def finish(self) -> None:
        """After the decode (or its failure): every layer's own rows back, the callback off; raises where a layer's
        query tensor was not what recall reads."""
        capture = self.session.capture
        if capture is not None:
            self.seconds += capture.recall_seconds()
            capture.set_recall(None)
        r = self._regs
        if r[ARMED]:
            _restore(r)
        r[ARMED] = 0
        if r[ERROR]:
            layer, r[ERROR] = int(r[ERROR]) - 1, 0
            raise LlamaError(f"recall: layer {layer}'s queries (Qcur) are not the float32 [rows, heads, head_dim] "
                             "it reads; nothing was lent after it")
