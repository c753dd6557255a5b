"""FrozenStore: frozen KV in memory-mapped arena files, one fixed-size slot per token, checked on every read.

A slot holds one token's K rows of every layer, then its V rows (V never transposed), and has its own hash
(xxh3-64). Slots live in a few large arena files that stay mapped; a thawed token's slot is reused by the next
freeze, so the files hold what is frozen and no more. Why slots and not one record per freeze: a policy that
follows its queries freezes and thaws a few scattered tokens every step, and records of 16 tokens stayed
allocated while any one of them was frozen: after 512 such steps at 2k the records held 5.4x the frozen bytes
(1.3x under asrkf's defaults), and a one-token read hashed all 16. A slot is written, hashed, and only then does
the caller drop the token from the cache; a failed write leaves nothing behind and raises :class:`StoreError`.
Every read checks the arena file's presence and size and each slot's hash, so a damaged or removed store is an
error, never wrong KV.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from . import pages
from .blob import Layout
from .errors import StoreError
from .kvcopy import Side, copy_rows, k_view, segment_side, slot_side, split_map

_SLOT_ALIGN = 64
_MIN_ARENA = 64 << 20  # bytes of the first arena file; later ones double, up to _MAX_ARENA
_MAX_ARENA = 1 << 30
_GIL_FREE_HASH = 65536  # bytes from which xxhash 4.1 hashes a buffer with the GIL let go (XXHASH_GIL_MINSIZE)
_AHEAD = 512  # slots of an arena kept faulted in past its newest one (refilled when half are used)


def digest(buf: np.ndarray | memoryview) -> int:
    """The hash slots are checked with (xxh3-64: about 13 GB/s here, against 1.7 GB/s for zlib's CRC-32)."""
    return xxhash.xxh3_64_intdigest(buf)


class Arena:
    """One memory-mapped file of ``slots`` slots and a stack of the free ones (the latest freed is reused first:
    its pages are the most likely to be resident).

    A sealed arena takes no new tokens: after a save has linked its file, nothing may write it again."""

    def __init__(self, arena_id: int, path: Path, slots: int, slot_bytes: int, layout: Layout, create: bool = True,
                 prefault: bool = False) -> None:
        self.arena_id, self.path, self.slot_bytes, self.sealed = arena_id, path, slot_bytes, not create
        self.prefault = prefault and create
        self._token_bytes = layout.bytes_per_cell  # what a slot's hash covers (not its alignment padding)
        self.size = slots * slot_bytes
        if create:
            with open(path, "wb+") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, self.size)  # ENOSPC here, not SIGBUS later
                else:  # pragma: no cover (macOS)
                    f.truncate(self.size)
        self.mm = np.memmap(path, dtype=np.uint8, mode="r+" if create else "r", shape=(self.size,))
        self.side: Side = slot_side(self.mm.view(np.ndarray), layout, slot_bytes)
        self._bytes = memoryview(self.mm.view(np.ndarray))
        self._free = np.arange(slots - 1, -1, -1, dtype=np.int64) if create else np.zeros(0, np.int64)
        self._top = len(self._free)
        self.used = 0  # slots holding a frozen token
        self._fresh = 0  # slots below this were handed out at least once (take() hands out the lowest first)
        self._faulted = 0  # bytes from the start asked to be faulted in
        if create:
            self.keep_ahead()

    @property
    def free(self) -> int:
        return self._top

    def take(self, n: int) -> np.ndarray:
        """Up to ``n`` free slots."""
        k = min(n, self._top)
        ids = self._free[self._top - k : self._top][::-1].copy()
        self._top -= k
        self.used += k
        if k:
            self._fresh = max(self._fresh, int(ids.max()) + 1)
        return ids

    def keep_ahead(self) -> None:
        """With ``prefault``, have the pages of the next ``_AHEAD`` never-used slots faulted in on a background thread
        (``MADV_POPULATE_WRITE``; Linux only, elsewhere nothing). A freeze writing fresh pages of a file mapping paid
        for every page fault: 11.5 MB (88 tokens of the LLaMA-3-8B shape) took 27-34 ms into fresh pages against
        2.5-2.7 ms into reused slots, and writes after the populate ran at 17.5 GB/s (2-core EPYC VM, ext4 and
        tmpfs alike). The populate leaves the bytes alone, so it may run while this thread writes the same pages.
        Sessions turn it on where the layers are on a GPU (an H100 host, the 8B shape: a 16k prompt read in 9.13
        s against 9.81, medians of 5; the reply's decode unchanged, its freezes 0.06 ms a token either way); on a CPU
        the thread would take a core from the decode (the default model at 4k on 2 cores: the prompt's freezes
        0.15-0.24 -> 0.07-0.11 s of a 18-24 s read, the reply's not faster, its decode within the machine's noise)."""
        if not self.prefault or not pages.populate_ok:
            return
        used = self._fresh * self.slot_bytes
        if self._faulted >= min(self.size, used + _AHEAD // 2 * self.slot_bytes):
            return
        end = -(-(used + _AHEAD * self.slot_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE
        start, end = self._faulted, min(self.size, end)
        self._faulted = end  # a page multiple or the end: the next start is page-aligned
        pages.fault_in(self.mm, [(start, end)])

    def give(self, ids: np.ndarray) -> None:
        """Slots whose tokens left (a sealed arena only counts them: its file belongs to a save too)."""
        self.used -= len(ids)
        if not self.sealed:
            self._free[self._top : self._top + len(ids)] = ids
            self._top += len(ids)

    def hashes(self, slots: np.ndarray) -> np.ndarray:
        """The hash of each of these slots' token bytes (uint64). Slots of more than 64 KB (the LLaMA-3-8B shape's
        are 128 KB) are hashed without the GIL by xxhash, so many of them are split over threads: on one thread,
        hashing took 3.8 of the 21 ms of a 400-token thaw of that shape on an H100's host (docs/gpu.md)."""
        n, step = self._token_bytes, self.slot_bytes
        ids = slots.tolist()

        def part(a: int, b: int) -> list[int]:
            return [digest(self._bytes[s * step : s * step + n]) for s in ids[a:b]]

        free = n > _GIL_FREE_HASH
        return np.array([h for p in split_map(part, len(ids), len(ids) * n if free else 0) for h in p], np.uint64)


class FrozenStore:
    """Host store of frozen KV rows for one session, found by position."""

    def __init__(self, layout: Layout, directory: str | Path | None = None, keep: bool = False,
                 prefault: bool = False) -> None:
        self.layout = layout
        self.keep = keep
        self.prefault = prefault  # new arenas fault their pages in ahead of the freezes (Arena.keep_ahead)
        self.slot_bytes = -(-layout.bytes_per_cell // _SLOT_ALIGN) * _SLOT_ALIGN
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="asrkf-store-"))
            self._owned = True
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._owned = False
        self._arenas: dict[int, Arena] = {}
        self._next_arena = 0
        self._arena = np.full(0, -1, np.int64)  # position -> arena id (-1: not frozen)
        self._slot = np.zeros(0, np.int64)  # position -> slot in its arena
        self._hash = np.zeros(0, np.uint64)
        self._token = np.zeros(0, np.int32)
        self._checked = np.zeros(0, bool)  # position -> its slot's hash checked since it was written (locate())
        self._n_frozen = 0
        self.changes = 0  # puts and releases so far: what caches of the frozen set (recall's) key on

    # writing
    def put(self, pos: np.ndarray, tokens: np.ndarray, src: Side, src_rows: np.ndarray) -> None:
        """Write rows ``src_rows`` of ``src`` as the frozen tokens ``pos`` (their ids ``tokens``), one slot each."""
        pos, src_rows = np.asarray(pos, np.int64), np.asarray(src_rows, np.int64)
        n = len(pos)
        placed: list[tuple[Arena, np.ndarray, slice]] = []
        hashes = np.zeros(n, np.uint64)
        try:
            done = 0
            while done < n:
                arena = self._open_arena()
                ids = arena.take(n - done)
                placed.append((arena, ids, slice(done, done + len(ids))))
                done += len(ids)
            for arena, ids, part in placed:
                copy_rows(src, arena.side, src_rows[part], ids, self.layout)
                hashes[part] = arena.hashes(ids)
                arena.keep_ahead()  # for the next freeze
                if self.keep:  # a temporary store dies with its session: no msync on the freeze path
                    arena.mm.flush()
        except OSError as e:
            for arena, ids, _ in placed:
                arena.give(ids)
            what = "disk full" if getattr(e, "errno", None) == 28 else e.strerror or str(e)
            raise StoreError(f"cannot freeze positions {_span(pos)}: {what} in {self.dir}; they stay in the cache") from e
        self._grow(int(pos.max()) + 1 if n else 0)
        for arena, ids, part in placed:
            self._arena[pos[part]] = arena.arena_id
            self._slot[pos[part]] = ids
        self._hash[pos], self._token[pos] = hashes, tokens
        self._checked[pos] = False
        self._n_frozen += n
        self.changes += 1

    def _open_arena(self) -> Arena:
        """An arena with a free slot: an open one, or a new file (twice the last one's size, up to 1 GiB)."""
        for arena in self._arenas.values():
            if not arena.sealed and arena.free:
                return arena
        last = max((a.size for a in self._arenas.values()), default=0)
        size = max(min(_MAX_ARENA, 2 * last) if last else _MIN_ARENA, self.slot_bytes)
        while (path := self.dir / f"arena-{self._next_arena:04d}.kv").exists():  # a resumed store's linked files
            self._next_arena += 1
        try:
            arena = Arena(self._next_arena, path, size // self.slot_bytes, self.slot_bytes, self.layout, prefault=self.prefault)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        self._arenas[arena.arena_id] = arena
        self._next_arena += 1
        return arena

    def _grow(self, end: int) -> None:
        if end <= len(self._arena):
            return
        grow = max(end, 2 * len(self._arena)) - len(self._arena)
        self._arena = np.concatenate([self._arena, np.full(grow, -1, np.int64)])
        self._slot = np.concatenate([self._slot, np.zeros(grow, np.int64)])
        self._hash = np.concatenate([self._hash, np.zeros(grow, np.uint64)])
        self._token = np.concatenate([self._token, np.zeros(grow, np.int32)])
        self._checked = np.concatenate([self._checked, np.zeros(grow, bool)])

    # reading
    def read(self, positions: np.ndarray) -> list[tuple[Side, np.ndarray, np.ndarray]]:
        """Where these frozen positions' rows lie, per arena: (its slots as a :class:`Side`, the slots, their
        indices in ``positions``), after checking that each arena file is there and whole and that every slot's
        hash matches."""
        p = np.asarray(positions, np.int64)
        if not self.is_frozen(p).all():
            raise ValueError("positions that are not frozen")
        ids = self._arena[p]
        out = []
        for aid in np.unique(ids).tolist():
            idx = np.flatnonzero(ids == aid)
            arena, slots = self._arenas[aid], self._slot[p[idx]]
            end = (int(slots.max()) + 1) * self.slot_bytes
            try:
                size = arena.path.stat().st_size
            except OSError as e:
                raise StoreError(f"frozen positions {_span(p[idx])}: store file {arena.path} is missing") from e
            if size < end:
                cut = p[idx][(slots + 1) * self.slot_bytes > size]
                raise StoreError(f"frozen positions {_span(cut)}: store file {arena.path} has {size} bytes, "
                                 f"their rows end at up to {end}")
            bad = p[idx][arena.hashes(slots) != self._hash[p[idx]]]
            if len(bad):
                raise StoreError(f"frozen positions {_span(bad)}: store file {arena.path} is corrupt (hash mismatch)")
            out.append((arena.side, slots, idx))
        return out

    def locate(self, positions: np.ndarray) -> tuple[list[Side], np.ndarray, np.ndarray]:
        """For rows lent to a decode's attention (:mod:`.recall`: every layer of every token reads some): the arenas'
        slots as :class:`Side` s, and per position the index of its side and its slot. Each slot is checked as
        :meth:`read` checks it the first time it is located after its write, not at every read."""
        p = np.asarray(positions, np.int64)
        fresh = ~self._checked[p]
        if fresh.any():
            self.read(p[fresh])
            self._checked[p[fresh]] = True
        ids, where = np.unique(self._arena[p], return_inverse=True)
        return [self._arenas[aid].side for aid in ids.tolist()], where.astype(np.int64), self._slot[p]

    def release(self, positions: np.ndarray) -> None:
        """Mark these frozen positions as thawed: their slots are free for the next freeze."""
        p = np.asarray(positions, np.int64)
        p = p[self.is_frozen(p)]
        ids = self._arena[p]
        for aid in np.unique(ids).tolist():
            arena = self._arenas[aid]
            arena.give(self._slot[p[ids == aid]])
            if arena.sealed and not arena.used:  # a saved or resumed file nothing here needs any more
                del self._arenas[aid]
                arena.path.unlink(missing_ok=True)
        self._arena[p] = -1
        self._checked[p] = False
        self._n_frozen -= len(p)
        self.changes += 1

    def is_frozen(self, positions: np.ndarray) -> np.ndarray:
        """Mask: which of ``positions`` are frozen here."""
        p = np.asarray(positions, np.int64)
        inside = (p >= 0) & (p < len(self._arena))
        out = np.zeros(len(p), bool)
        out[inside] = self._arena[p[inside]] >= 0
        return out

    def positions(self, p0: int = 0, p1: int | None = None) -> np.ndarray:
        """Frozen positions in ``[p0, p1)`` (every one by default), sorted."""
        lo, hi = max(0, p0), len(self._arena) if p1 is None else min(p1, len(self._arena))
        return (np.flatnonzero(self._arena[lo:hi] >= 0) + lo).astype(np.int64)

    def keys(self, layer: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per arena: (its frozen positions, their K rows of ``layer`` as raw bytes [n, k_row]), read as a thaw
        reads them (checked)."""
        pos = self.positions()
        for side, slots, idx in self.read(pos):
            yield pos[idx], k_view(side, self.layout, layer)[slots]

    @property
    def frozen_tokens(self) -> int:
        return self._n_frozen

    @property
    def frozen_bytes(self) -> int:
        """Bytes of the slots that hold frozen tokens."""
        return self._n_frozen * self.slot_bytes

    @property
    def file_bytes(self) -> int:
        """Bytes of the arena files: what the store takes on disk, the slots held and free."""
        return sum(a.size for a in self._arenas.values())

    # saving and resuming
    def state(self) -> dict[str, Any]:
        """The layout and, per arena file (a :class:`~pathlib.Path` to carry along), its size and the positions
        it holds: their slots, hashes and token ids. Seals every arena: a save may link the files, so nothing
        writes them again."""
        pos = self.positions()
        arenas = {}
        for arena in self._arenas.values():
            arena.sealed = True
            mine = pos[self._arena[pos] == arena.arena_id]
            if len(mine):
                arenas[arena.path.stem] = {"file": arena.path, "size": arena.size, "pos": mine, "slot": self._slot[mine],
                                           "hash": self._hash[mine], "tokens": self._token[mine]}
        return {"layout": asdict(self.layout), "slot_bytes": self.slot_bytes, "arenas": arenas}

    @classmethod
    def from_state(cls, state: dict[str, Any], directory: str | Path | None = None, keep: bool = False,
                   prefault: bool = False) -> FrozenStore:
        """A store holding the tokens of :meth:`state`, its arena files linked (or copied) into this store's
        directory and sealed (the save keeps its bytes). A store saved as 16-token segments (chat format 2) is
        copied into slots."""
        store = cls(Layout(**state["layout"]), directory, keep, prefault)
        try:
            store._take(state)
        except BaseException:
            store.close()
            raise
        return store

    def _take(self, state: dict[str, Any]) -> None:
        if "segments" in state:
            self._take_segments(state)
            return
        if int(state["slot_bytes"]) != self.slot_bytes:
            raise StoreError(f"the saved store has {state['slot_bytes']}-byte slots, this one {self.slot_bytes}")
        for a in state["arenas"].values():
            src = Path(a["file"])
            if not src.exists() or src.stat().st_size != int(a["size"]):
                raise StoreError(f"frozen store file {src.name} is missing or truncated")
            link_or_copy(src, self.dir / src.name)
            arena = Arena(self._next_arena, self.dir / src.name, int(a["size"]) // self.slot_bytes, self.slot_bytes,
                          self.layout, create=False)
            self._arenas[arena.arena_id] = arena
            self._next_arena += 1
            pos = a["pos"].astype(np.int64)
            self._grow(int(pos.max()) + 1 if len(pos) else 0)
            self._arena[pos], self._slot[pos] = arena.arena_id, a["slot"].astype(np.int64)
            self._hash[pos], self._token[pos] = a["hash"].astype(np.uint64), a["tokens"].astype(np.int32)
            arena.used = len(pos)
            self._n_frozen += len(pos)
            self.changes += 1

    def _take_segments(self, state: dict[str, Any]) -> None:
        """Copy the frozen rows of a format-2 store (segments of ``[n_layer, n, row]`` K then V) into slots."""
        files: dict[str, np.ndarray] = {}
        for s in state["segments"].values():
            a = state["arenas"][s["arena"]]
            src, off, nbytes = Path(a["file"]), int(s["offset"]), int(s["nbytes"])
            pos, live = s["pos"].astype(np.int64), s["live"].astype(bool)
            if s["arena"] not in files:
                if not src.exists() or src.stat().st_size != int(a["size"]):
                    raise StoreError(f"frozen store file {src.name} is missing or truncated")
                files[s["arena"]] = np.memmap(src, dtype=np.uint8, mode="r", shape=(int(a["size"]),)).view(np.ndarray)
            region = files[s["arena"]][off : off + nbytes]
            if digest(region) != int(s["hash"]):
                raise StoreError(f"frozen positions {_span(pos)}: store file {src.name} is corrupt (hash mismatch)")
            rows = np.flatnonzero(live)
            self.put(pos[rows], s["tokens"].astype(np.int32)[rows], segment_side(region, self.layout, len(pos)), rows)

    def close(self) -> None:
        if self.keep:
            return
        if self._owned:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for arena in self._arenas.values():
                arena.path.unlink(missing_ok=True)
        self._arenas.clear()
        self._arena = np.full(0, -1, np.int64)
        self._n_frozen = 0
        self.changes += 1


def _span(positions: np.ndarray) -> str:
    """Positions for a message: the first run of consecutive ones, and how many others."""
    p = np.sort(np.asarray(positions, np.int64))
    if not len(p):
        return "[]"
    breaks = np.flatnonzero(np.diff(p) != 1)
    k = int(breaks[0]) + 1 if len(breaks) else len(p)
    return f"[{int(p[0])}, {int(p[0]) + k})" + (f" and {len(p) - k} more" if len(p) > k else "")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no bytes copied), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
