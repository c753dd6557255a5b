"""FrozenStore: frozen KV in memory-mapped segment files, found by position, checked on every read.

One segment per freeze: ``[n_layer, n, k_row]`` K rows then ``[n_layer, n, v_row]`` V rows, tokens in
position order, so :meth:`FrozenStore.keys` can hand a scorer each layer's keys without a copy.
A segment is written, checksummed (CRC-32), and only then does the caller drop the range from the
cache; a failed write leaves nothing behind and raises :class:`StoreError`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .blob import Layout
from .errors import StoreError
from .kvcopy import Side, copy_rows, segment_side


@dataclass
class Segment:
    """One frozen range on disk: its positions, tokens, checksum and which rows are still frozen."""

    seg_id: int
    path: Path
    pos: np.ndarray  # int64 [n], increasing
    tokens: np.ndarray  # int32 [n]
    crc: int
    nbytes: int
    live: np.ndarray = field(init=False)  # bool [n]: still frozen
    verified_mtime: int = field(default=-1, init=False)  # file mtime when the checksum last matched

    def __post_init__(self) -> None:
        self.live = np.ones(len(self.pos), dtype=bool)

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
        self._segments: dict[int, Segment] = {}
        self._where: dict[int, tuple[int, int]] = {}  # position -> (segment id, row)
        self._next_id = 0

    # writing
    def put(self, pos: np.ndarray, tokens: np.ndarray, src: Side, src_rows: np.ndarray) -> Segment:
        """Write rows ``src_rows`` of ``src`` (positions ``pos``, increasing) as a new segment."""
        n = len(pos)
        nbytes = n * self.layout.bytes_per_cell
        seg_id = self._next_id
        path = self.dir / f"seg-{seg_id:06d}.kv"
        try:
            with open(path, "wb+") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, nbytes)  # ENOSPC here, not SIGBUS later
                else:  # pragma: no cover (macOS)
                    f.truncate(nbytes)
            mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
            copy_rows(src, segment_side(mm, self.layout, n), src_rows, np.arange(n), self.layout)
            crc = zlib.crc32(mm)
            if self.keep:  # a temporary store dies with its session: no msync on the freeze path
                mm.flush()
            del mm
        except OSError as e:
            path.unlink(missing_ok=True)
            what = "disk full" if getattr(e, "errno", None) == 28 else e.strerror or str(e)
            raise StoreError(
                f"cannot freeze positions [{int(pos[0])}, {int(pos[-1]) + 1}): {what} in {self.dir}; "
                "the range stays in the cache"
            ) from e
        self._next_id += 1
        seg = Segment(seg_id, path, np.asarray(pos, np.int64), np.asarray(tokens, np.int32), crc, nbytes)
        self._segments[seg_id] = seg
        for row, p in enumerate(seg.pos):
            self._where[int(p)] = (seg_id, row)
        return seg

    def adopt(self, seg: Segment) -> None:
        """Register an existing segment file (e.g. a resumed session's); its live rows become frozen positions."""
        if seg.seg_id in self._segments:
            raise StoreError(f"segment {seg.seg_id} is already in the store")
        self._segments[seg.seg_id] = seg
        for row in np.flatnonzero(seg.live).tolist():
            self._where[int(seg.pos[row])] = (seg.seg_id, row)
        self._next_id = max(self._next_id, seg.seg_id + 1)

    # reading
    def read(self, seg: Segment) -> Side:
        """The segment's bytes, checked against length and checksum (again whenever the file changed)."""
        try:
            st = seg.path.stat()
            size = st.st_size
        except OSError as e:
            raise StoreError(f"frozen range {seg.span}: segment {seg.path} is missing") from e
        if size != seg.nbytes:
            raise StoreError(f"frozen range {seg.span}: segment {seg.path} has {size} bytes, expected {seg.nbytes}")
        mm = np.memmap(seg.path, dtype=np.uint8, mode="r", shape=(seg.nbytes,))
        if st.st_mtime_ns != seg.verified_mtime:  # partial thaws read a segment many times: check it once
            if zlib.crc32(mm) != seg.crc:
                raise StoreError(f"frozen range {seg.span}: segment {seg.path} is corrupt (checksum mismatch)")
            seg.verified_mtime = st.st_mtime_ns
        return segment_side(mm, self.layout, len(seg.pos))

    def locate(self, p0: int, p1: int) -> dict[int, np.ndarray]:
        """Frozen positions in ``[p0, p1)``, grouped by segment id (rows, position order)."""
        out: dict[int, list[int]] = {}
        for seg in self._segments.values():
            lo, hi = np.searchsorted(seg.pos, [p0, p1])
            rows = np.nonzero(seg.live[lo:hi])[0] + lo
            if len(rows):
                out[seg.seg_id] = rows.tolist()
        return {k: np.asarray(v, np.int64) for k, v in out.items()}

    def segment(self, seg_id: int) -> Segment:
        return self._segments[seg_id]

    def release(self, seg_id: int, rows: np.ndarray) -> None:
        """Mark rows as thawed; a segment with no frozen rows left is deleted."""
        seg = self._segments[seg_id]
        seg.live[rows] = False
        for p in seg.pos[rows]:
            self._where.pop(int(p), None)
        if not seg.live.any():
            del self._segments[seg_id]
            seg.path.unlink(missing_ok=True)

    def is_frozen(self, positions: np.ndarray) -> np.ndarray:
        """Mask: which of ``positions`` are frozen here."""
        return np.fromiter((int(p) in self._where for p in positions), bool, len(positions))

    def positions(self) -> np.ndarray:
        """Every frozen position, sorted."""
        return np.sort(np.fromiter(self._where, np.int64, len(self._where)))

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
        return len(self._where)

    @property
    def frozen_bytes(self) -> int:
        """Bytes on disk of segments that still hold frozen rows."""
        return sum(s.nbytes for s in self._segments.values())

    # saving and resuming
    def state(self) -> dict[str, Any]:
        """The layout and, per segment, its file (a :class:`~pathlib.Path` to carry along), checksum and index."""
        return {"layout": asdict(self.layout), "segments": {
            str(seg.seg_id): {"file": seg.path, "crc": seg.crc, "nbytes": seg.nbytes, "pos": seg.pos,
                              "tokens": seg.tokens, "live": seg.live} for seg in self._segments.values()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], directory: str | Path | None = None, keep: bool = False) -> FrozenStore:
        """A store holding the segments of :meth:`state`, their files linked (or copied) into its directory."""
        store = cls(Layout(**state["layout"]), directory, keep)
        for sid, s in state["segments"].items():
            src = Path(s["file"])
            if not src.exists() or src.stat().st_size != int(s["nbytes"]):
                raise StoreError(f"frozen segment {src.name} is missing or truncated")
            dst = store.dir / src.name
            link_or_copy(src, dst)
            seg = Segment(int(sid), dst, s["pos"].astype(np.int64), s["tokens"].astype(np.int32), int(s["crc"]), int(s["nbytes"]))
            seg.live = s["live"].astype(bool).copy()
            store.adopt(seg)
        return store

    def close(self) -> None:
        if self.keep:
            return
        if self._owned:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for seg in self._segments.values():
                seg.path.unlink(missing_ok=True)
        self._segments.clear()
        self._where.clear()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no bytes copied), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
