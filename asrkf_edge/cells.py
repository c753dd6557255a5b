"""A mirror of llama.cpp's KV cell allocation, and thaw placement that puts tokens in chosen cells.

Why: attention sums over cells in cell order, so a token that comes back into another cell changes
the rounding of every later step (measured: max |logit diff| 0.84 after a thaw shifted by 7 cells,
0.0 when cells are kept; flash attention off, CPU). llama.cpp has no public call to restore into given
cells, but its slot search is deterministic (``find_slot`` in src/llama-kv-cache.cpp: scan free cells in
ring order from ``head``, restarting at 0 when ``head > used + 2 n``; ``seq_rm`` moves ``head`` down to
the first freed cell; an applied batch moves it past its last cell). Mirroring it lets a thaw blob be
padded with dummy cells so that each real cell lands exactly where we want it. Every freeze checks the
mirror against the cell order llama.cpp reports.
"""

from __future__ import annotations

import numpy as np

DUMMY_POS = 1 << 30
"""Positions of padding cells (scratch sequence only, never copied to sequence 0)."""

_NEAR = 256
"""Cells after the search start looked at first: listing every free cell took 0.06 ms of each decoded token on an
H100 host at 16k (cProfile, docs/results/gpu-s26/prof-16k.txt)."""

LANE = 64
"""Relocated cells keep their home cell's residue modulo this, so SIMD lanes sum in the same groups."""


class CellMap:
    """Which position and sequences each cell holds, and llama.cpp's search ``head``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = np.full(size, -1, dtype=np.int64)
        self.seqs = np.zeros(size, dtype=np.uint8)  # bit s set: sequence s holds the cell
        self.head = 0

    @property
    def used(self) -> int:
        return int(np.count_nonzero(self.seqs))

    def free_order(self, start: int) -> np.ndarray:
        """Free cells in the order llama.cpp's non-contiguous search visits them from ``start``."""
        free = np.flatnonzero(self.seqs == 0)
        return np.concatenate([free[free >= start], free[free < start]])

    def search_start(self, n: int) -> int:
        return 0 if self.head > self.used + 2 * n else self.head

    def find_slot(self, n: int) -> np.ndarray:
        start = self.search_start(n)
        near = start + np.flatnonzero(self.seqs[start : start + _NEAR] == 0)[:n]
        if len(near) == n:  # a decode's cell is nearly always just past head: no scan of the whole map
            return near
        order = self.free_order(start)
        if len(order) < n:
            raise ValueError(f"{n} cells wanted, {len(order)} free")
        return order[:n]

    def apply(self, cells: np.ndarray, positions: np.ndarray, seq: int) -> None:
        self.pos[cells] = positions
        self.seqs[cells] |= np.uint8(1 << seq)
        self.head = int(cells[-1]) + 1

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> np.ndarray:
        """Drop ``seq`` from cells with positions in [p0, p1); returns the cells that became free."""
        hit = (self.seqs & np.uint8(1 << seq)) != 0
        if p0 >= 0:
            hit &= self.pos >= p0
        if p1 >= 0:
            hit &= self.pos < p1
        return self._drop(seq, np.flatnonzero(hit))

    def seq_rm_at(self, seq: int, positions: np.ndarray) -> np.ndarray:
        """:meth:`seq_rm` of every run of these positions at once (the search start moves to the lowest freed cell
        either way); returns the cells that became free."""
        return self._drop(seq, np.flatnonzero(((self.seqs & np.uint8(1 << seq)) != 0) & np.isin(self.pos, positions)))

    def _drop(self, seq: int, idx: np.ndarray) -> np.ndarray:
        self.seqs[idx] &= ~np.uint8(1 << seq)
        freed = idx[self.seqs[idx] == 0]
        self.pos[freed] = -1
        if len(freed) and freed[0] < self.head:
            self.head = int(freed[0])
        return freed

    def seq_cp_at(self, src: int, dst: int, positions: np.ndarray) -> None:
        """:meth:`seq_cp` of every run of these positions at once."""
        self.seqs[((self.seqs & np.uint8(1 << src)) != 0) & np.isin(self.pos, positions)] |= np.uint8(1 << dst)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        hit = ((self.seqs & np.uint8(1 << src)) != 0) & (self.pos >= p0) & (self.pos < p1)
        self.seqs[hit] |= np.uint8(1 << dst)

    def seq_add(self, seq: int, p0: int, delta: int) -> None:
        """Mirror of ``llama_memory_seq_add`` for [p0, end) with no position going negative: the search restarts at 0."""
        hit = ((self.seqs & np.uint8(1 << seq)) != 0) & (self.pos >= p0)
        self.pos[hit] += delta
        self.head = 0

    def cells_of(self, seq: int) -> np.ndarray:
        return np.flatnonzero((self.seqs & np.uint8(1 << seq)) != 0)

    def cell_of(self, seq: int) -> dict[int, int]:
        cells = self.cells_of(seq)
        return dict(zip(self.pos[cells].tolist(), cells.tolist(), strict=True))

    def decode(self, positions: np.ndarray, seq: int = 0) -> np.ndarray:
        """Mirror a decode of one ubatch; returns the cells its tokens went to."""
        cells = self.find_slot(len(positions))
        self.apply(cells, positions, seq)
        return cells

    def plan_restore(self, targets: np.ndarray) -> np.ndarray:
        """Blob order that makes a restore land cell ``targets[i]`` for real cell ``i``.

        Returns, per blob cell, the index of the real cell it carries or -1 for a dummy. Every target
        must be free. Padding follows llama.cpp's scan; if the scan would restart at 0 (few cells in
        use, ``head`` far up), the blob is planned for that start instead, or padded until it does not.
        """
        targets = np.asarray(targets, dtype=np.int64)
        if len(set(targets.tolist())) != len(targets) or np.any(self.seqs[targets] != 0):
            raise ValueError("restore targets must be distinct free cells")
        which = np.full(self.size, -1, dtype=np.int64)
        which[targets] = np.arange(len(targets))
        plans = []
        for start in (self.head, 0):
            order = self.free_order(start)
            where = np.flatnonzero(which[order] >= 0)
            n = int(where[-1]) + 1
            plans.append((start, order, n))
        (s_head, o_head, n_head), (_, o_zero, n_zero) = plans
        used = self.used
        from_head, from_zero = not self.head > used + 2 * n_head, self.head > used + 2 * n_zero
        if from_head and (not from_zero or n_head <= n_zero):  # the shorter blob of the searches that work
            return which[o_head[:n_head]]
        if from_zero:
            return which[o_zero[:n_zero]]
        need = (self.head - used + 1) // 2  # pad until the search no longer restarts at 0
        if need > len(o_head):
            raise ValueError("not enough free cells to place the restore")
        return which[o_head[:need]]
