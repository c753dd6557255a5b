"""FrozenStore: frozen KV in memory-mapped arena files, found by position, checked on every read.

One segment per freeze: ``[n_layer, n, k_row]`` K rows then ``[n_layer, n, v_row]`` V rows, tokens in
position order, so :meth:`FrozenStore.keys` can hand a scorer each layer's keys without a copy. Segments
live in a few large arena files that stay mapped and whose space is reused when a segment is thawed
(a new file, its page faults and a checksum of it per freeze held the copy path at about 1 GB/s). A
segment is written, hashed (xxh3-64), and only then does the caller drop the range from the cache; a
failed write leaves nothing behind and raises :class:`StoreError`. Every read checks the arena file's
presence and size and the segment's hash, so a damaged or removed store is an error, never wrong KV.
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .blob import Layout
from .errors import StoreError
from .kvcopy import Side, copy_rows, segment_side

_ALIGN = 4096
_MIN_ARENA = 64 << 20  # bytes of the first arena file; later ones double, up to _MAX_ARENA
_MAX_ARENA = 1 << 30
SEGMENT_TOKENS = 16  # most tokens one segment holds (one hash, one read)


def digest(buf: np.ndarray) -> int:
    """The hash segments are checked with (xxh3-64: about 13 GB/s here, against 1.7 GB/s for zlib's CRC-32)."""
    return xxhash.xxh3_64_intdigest(buf)


class Arena:
    """One memory-mapped file holding segments; free space is a sorted list of (offset, size) extents.

    A sealed arena takes no new segments: after a save has linked its file, nothing may write it again."""

    def __init__(self, path: Path, size: int, create: bool = True) -> None:
        self.path, self.size, self.sealed = path, size, not create
        if create:
            with open(path, "wb+") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, size)  # ENOSPC here, not SIGBUS later
                else:  # pragma: no cover (macOS)
                    f.truncate(size)
        self.mm = np.memmap(path, dtype=np.uint8, mode="r+" if create else "r", shape=(size,))
        self.free: list[tuple[int, int]] = [(0, size)] if create else []
        self.used = 0  # segments held

    def take(self, nbytes: int) -> int | None:
        """Offset of a fresh region of ``nbytes`` (first fit), or None when none is free."""
        need = -(-nbytes // _ALIGN) * _ALIGN
        for i, (off, size) in enumerate(self.free):
            if size >= need:
                self.free[i : i + 1] = [(off + need, size - need)] if size > need else []
                self.used += 1
                return off
        return None

    def give(self, off: int, nbytes: int) -> None:
        """Return a region, merged with free neighbours."""
        size = -(-nbytes // _ALIGN) * _ALIGN
        self.used -= 1
        i = bisect.bisect(self.free, (off, 0))
        if i < len(self.free) and self.free[i][0] == off + size:
            size += self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:
            off, size = self.free[i - 1][0], self.free[i - 1][1] + size
            self.free.pop(i - 1)
            i -= 1
        self.free.insert(i, (off, size))

    def region(self, off: int, nbytes: int) -> np.ndarray:
        return self.mm[off : off + nbytes]


@dataclass
class Segment:
    """One frozen range: where its bytes lie, its positions, tokens, hash and which rows are still frozen."""

    seg_id: int
    arena: Arena
    offset: int
    pos: np.ndarray  # int64 [n], increasing
    tokens: np.ndarray  # int32 [n]
    hash: int
    nbytes: int
    live: np.ndarray = field(init=False)  # bool [n]: still frozen

    def __post_init__(self) -> None:
        self.live = np.ones(len(self.pos), dtype=bool)

    @property
    def path(self) -> Path:
        """The arena file the segment lies in."""
        return self.arena.path

    @property
    def span(self) -> str:
        return f"[{int(self.pos[0])}, {int(self.pos[-1]) + 1})"


class FrozenStore:
    """Host store of frozen KV rows for one session."""

    def __init__(self, layout: Layout, directory: str | Path | None = None, keep: bool = False) -> None:
        self.layout = layout
        self.keep = keep
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="asrkf-store-"))
            self._owned = True
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._owned = False
        self._arenas: list[Arena] = []
        self._segments: dict[int, Segment] = {}
        self._seg_of = np.full(0, -1, np.int64)  # position -> segment id (-1: not frozen)
        self._row_of = np.zeros(0, np.int64)  # position -> row in its segment
        self._n_frozen = 0
        self._next_id = 0

    # writing
    def put(self, pos: np.ndarray, tokens: np.ndarray, src: Side, src_rows: np.ndarray) -> list[Segment]:
        """Write rows ``src_rows`` of ``src`` (positions ``pos``, increasing) as new segments of at most
        ``SEGMENT_TOKENS`` tokens each: every read hashes its whole segment, so a thaw of one token from a
        prompt frozen in one piece hashed megabytes (14 ms of a 35 ms thaw at 2k, one segment per freeze)."""
        return [self._put(pos[i : i + SEGMENT_TOKENS], tokens[i : i + SEGMENT_TOKENS], src, src_rows[i : i + SEGMENT_TOKENS])
                for i in range(0, len(pos), SEGMENT_TOKENS)]

    def _put(self, pos: np.ndarray, tokens: np.ndarray, src: Side, src_rows: np.ndarray) -> Segment:
        n = len(pos)
        nbytes = n * self.layout.bytes_per_cell
        try:
            arena, off = self._room(nbytes)
            mm = arena.region(off, nbytes)
            copy_rows(src, segment_side(mm, self.layout, n), src_rows, np.arange(n), self.layout)
            h = digest(mm)
            if self.keep:  # a temporary store dies with its session: no msync on the freeze path
                arena.mm.flush()
        except OSError as e:
            what = "disk full" if getattr(e, "errno", None) == 28 else e.strerror or str(e)
            raise StoreError(
                f"cannot freeze positions [{int(pos[0])}, {int(pos[-1]) + 1}): {what} in {self.dir}; "
                "the range stays in the cache"
            ) from e
        seg = Segment(self._next_id, arena, off, np.asarray(pos, np.int64), np.asarray(tokens, np.int32), h, nbytes)
        self._next_id += 1
        self._add(seg)
        return seg

    def _room(self, nbytes: int) -> tuple[Arena, int]:
        for arena in self._arenas:
            if not arena.sealed and (off := arena.take(nbytes)) is not None:
                return arena, off
        size = max(min(_MAX_ARENA, 2 * self._arenas[-1].size) if self._arenas else _MIN_ARENA, -(-nbytes // _ALIGN) * _ALIGN)
        path = self.dir / f"arena-{len(self._arenas):04d}.kv"
        try:
            arena = Arena(path, size)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        self._arenas.append(arena)
        off = arena.take(nbytes)
        assert off is not None
        return arena, off

    def _add(self, seg: Segment) -> None:
        self._segments[seg.seg_id] = seg
        end = int(seg.pos[-1]) + 1
        if end > len(self._seg_of):
            grow = max(end, 2 * len(self._seg_of)) - len(self._seg_of)
            self._seg_of = np.concatenate([self._seg_of, np.full(grow, -1, np.int64)])
            self._row_of = np.concatenate([self._row_of, np.zeros(grow, np.int64)])
        rows = np.flatnonzero(seg.live)
        self._seg_of[seg.pos[rows]] = seg.seg_id
        self._row_of[seg.pos[rows]] = rows
        self._n_frozen += len(rows)

    # reading
    def read(self, seg: Segment) -> Side:
        """The segment's bytes, after checking that its arena file is there, whole, and that the hash matches."""
        try:
            size = seg.path.stat().st_size
        except OSError as e:
            raise StoreError(f"frozen range {seg.span}: store file {seg.path} is missing") from e
        if size < seg.offset + seg.nbytes:
            raise StoreError(f"frozen range {seg.span}: store file {seg.path} has {size} bytes, "
                             f"the segment ends at {seg.offset + seg.nbytes}")
        mm = seg.arena.region(seg.offset, seg.nbytes)
        if digest(mm) != seg.hash:
            raise StoreError(f"frozen range {seg.span}: store file {seg.path} is corrupt (hash mismatch)")
        return segment_side(mm, self.layout, len(seg.pos))

    def locate(self, p0: int, p1: int) -> dict[int, np.ndarray]:
        """Frozen positions in ``[p0, p1)``, grouped by segment id (rows, position order)."""
        lo, hi = max(0, p0), min(p1, len(self._seg_of))
        where = np.flatnonzero(self._seg_of[lo:hi] >= 0) + lo
        segs, rows = self._seg_of[where], self._row_of[where]
        return {int(s): rows[segs == s] for s in np.unique(segs)}

    def find(self, positions: np.ndarray) -> list[tuple[Segment, np.ndarray, np.ndarray]]:
        """The segments holding these frozen positions, each with (its rows, their indices in ``positions``):
        only the segments a thaw needs, not every one its range overlaps."""
        p = np.asarray(positions, np.int64)
        segs = self._seg_of[p]
        if (segs < 0).any():
            raise ValueError("positions that are not frozen")
        order = np.argsort(segs, kind="stable")
        cuts = np.flatnonzero(np.diff(segs[order])) + 1
        return [(self._segments[int(segs[idx[0]])], self._row_of[p[idx]], idx) for idx in np.split(order, cuts)]

    def segment(self, seg_id: int) -> Segment:
        return self._segments[seg_id]

    def release(self, seg_id: int, rows: np.ndarray) -> None:
        """Mark rows as thawed; a segment with no frozen rows left gives its space back."""
        seg = self._segments[seg_id]
        rows = rows[seg.live[rows]]
        seg.live[rows] = False
        self._seg_of[seg.pos[rows]] = -1
        self._n_frozen -= len(rows)
        if not seg.live.any():
            del self._segments[seg_id]
            seg.arena.give(seg.offset, seg.nbytes)
            if seg.arena.sealed and not seg.arena.used:  # a saved or resumed file nothing here needs any more
                self._arenas.remove(seg.arena)
                seg.path.unlink(missing_ok=True)

    def is_frozen(self, positions: np.ndarray) -> np.ndarray:
        """Mask: which of ``positions`` are frozen here."""
        p = np.asarray(positions, np.int64)
        inside = (p >= 0) & (p < len(self._seg_of))
        out = np.zeros(len(p), bool)
        out[inside] = self._seg_of[p[inside]] >= 0
        return out

    def positions(self) -> np.ndarray:
        """Every frozen position, sorted."""
        return np.flatnonzero(self._seg_of >= 0).astype(np.int64)

    def segments(self) -> Iterator[Segment]:
        return iter(list(self._segments.values()))

    def keys(self, layer: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per segment: (positions of frozen rows, their K rows of ``layer`` as raw bytes [n, k_row])."""
        for seg in self._segments.values():
            side = self.read(seg)
            kr = self.layout.k_row
            k = side.buf[side.k_off[layer] : side.k_off[layer] + side.n * kr].reshape(side.n, kr)
            yield seg.pos[seg.live], k[seg.live]

    @property
    def frozen_tokens(self) -> int:
        return self._n_frozen

    @property
    def frozen_bytes(self) -> int:
        """Bytes of segments that still hold frozen rows."""
        return sum(s.nbytes for s in self._segments.values())

    # saving and resuming
    def state(self) -> dict[str, Any]:
        """The layout, the arena files (:class:`~pathlib.Path` s to carry along) and, per segment, where it lies,
        its hash and index. Seals every arena: a save may link the files, so nothing writes them again."""
        for arena in self._arenas:
            arena.sealed = True
        return {"layout": asdict(self.layout),
                "arenas": {a.path.stem: {"file": a.path, "size": a.size} for a in self._arenas if a.used},
                "segments": {str(s.seg_id): {"arena": s.path.stem, "offset": s.offset, "nbytes": s.nbytes, "hash": str(s.hash),
                                             "pos": s.pos, "tokens": s.tokens, "live": s.live} for s in self._segments.values()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], directory: str | Path | None = None, keep: bool = False) -> FrozenStore:
        """A store holding the segments of :meth:`state`, their arena files linked (or copied) into its directory
        and sealed (the save keeps its bytes)."""
        store = cls(Layout(**state["layout"]), directory, keep)
        arenas = {}
        for name, a in state["arenas"].items():
            src = Path(a["file"])
            if not src.exists() or src.stat().st_size != int(a["size"]):
                raise StoreError(f"frozen store file {src.name} is missing or truncated")
            link_or_copy(src, store.dir / src.name)
            arenas[name] = Arena(store.dir / src.name, int(a["size"]), create=False)
        store._arenas = list(arenas.values())
        for sid, s in state["segments"].items():
            arena = arenas[s["arena"]]
            seg = Segment(int(sid), arena, int(s["offset"]), s["pos"].astype(np.int64), s["tokens"].astype(np.int32),
                          int(s["hash"]), int(s["nbytes"]))
            seg.live = s["live"].astype(bool).copy()
            arena.used += 1
            store._add(seg)
            store._next_id = max(store._next_id, seg.seg_id + 1)
        return store

    def close(self) -> None:
        if self.keep:
            return
        if self._owned:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for arena in self._arenas:
                arena.path.unlink(missing_ok=True)
        self._segments.clear()
        self._arenas.clear()
        self._seg_of = np.full(0, -1, np.int64)
        self._n_frozen = 0


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no bytes copied), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
