"""Session: one logical token sequence on a bounded pool of llama.cpp KV cells; the freeze/thaw path.

Sequence 0 holds the active tokens; sequence 1 is a scratch area. Freeze copies a position range to
the scratch sequence, serializes it (``llama_state_seq_get_data``, O(range)), writes it to the
:class:`~asrkf_edge.store.FrozenStore` and only then removes it from the cache; with flash attention and a
capture that has seen the cache's tensors, scattered cells are instead gathered on the cache's device
(:mod:`asrkf_edge.gather`) straight into the store. Thaw builds a blob from
the store whose cells land exactly in chosen cells (:mod:`asrkf_edge.cells`), loads it into the
scratch sequence and copies it to sequence 0. Positions never change, so RoPE stays exact (only the
context-shift baseline renumbers them, as llama.cpp does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import blob as blobfmt
from .capture import Capture, CaptureSpec
from .cells import DUMMY_POS, LANE, CellMap
from .errors import LlamaError, OutOfCellsError
from .gather import RowGather
from .kvcopy import Side, blob_side, copy_rows, empty_blob, k_view, v_view
from .llama import BLOB_REUSE_MAX, SCRATCH_SEQ, Context, ContextConfig, Model
from .store import FrozenStore

if TYPE_CHECKING:
    from .recall import Recall

log = logging.getLogger(__name__)

_CPU_GATHER_RUNS = 4  # runs of cells from which a freeze on the CPU gathers (Session._freeze_gathered)

_TYPE_BYTES = {0: (4, 1), 1: (2, 1), 30: (2, 1), 8: (34, 32), 2: (18, 32)}  # ggml type: (bytes, per elems)

Evictor = Callable[["Session", int, int, np.ndarray], np.ndarray]
"""Chooses which active positions leave: (session, at least, preferably, candidates) -> positions.

Freezing runs of tokens at once is cheaper than one per decode, so the session asks for more than it
needs; an evictor may return fewer than "preferably" (not fewer than "at least") to spare tokens it wants."""

OnDecode = Callable[["Session", int, int], None]
"""Called after every decode with (session, first position, token count); the capture holds its tensors.
As ``before_decode``, it is called before one, e.g. to switch the capture on or off for it."""

OnCopy = Callable[[np.ndarray, blobfmt.Parsed], None]
"""Called with (positions in cell order, parsed blob) whenever KV rows are copied out (freeze, peek)."""


@dataclass(frozen=True)
class KvStats:
    """KV figures of a session (tokens, bytes, copy events and their time) and, filled in by a
    :class:`~asrkf_edge.runner.Runner`, of the policy driving it. :meth:`as_dict` keeps the JSON keys."""

    logical_tokens: int
    active_tokens: int
    frozen_tokens: int
    active_kv_bytes: int
    frozen_kv_bytes: int
    store_bytes: int
    freeze_events: int
    thaw_events: int
    freeze_seconds: float
    thaw_seconds: float
    kv_bytes_per_token: int
    cells: int
    active_tokens_peak: int
    active_tokens_mean: float
    dropped_tokens: int
    upload_runs: int = 0  # runs of consecutive cells thaws and restores wrote: one copy each per layer and K/V
    recalled_rows: int = 0  # (token, layer) rows lent to a layer inside a decode (:mod:`asrkf_edge.recall`)
    recall_seconds: float = 0.0  # choosing and lending them, inside llama.cpp's decodes
    policy: str = ""
    budget_tokens: int | None = None  # None: the cache holds the whole context (unbounded policies)
    recoveries: int = 0
    policy_seconds: float = 0.0  # in the policy's hooks and evictions, freezes and thaws included
    observe_seconds: float = 0.0  # folding captured attention into importance
    key_mirror_bytes: int = 0
    recovery_log: tuple[dict[str, object], ...] = ()

    def as_dict(self, log: bool = True) -> dict[str, object]:
        """Every figure under its JSON key (``log=False``: without the recovery log)."""
        d = asdict(self)
        d["recovery_log"] = list(self.recovery_log)
        if not log:
            del d["recovery_log"]
        return d


def runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Half-open runs of consecutive positions in a sorted array."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(positions)]])
    return [(int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


class Session:
    """A logical context that may be longer than the cache: eval, freeze, thaw, kv_stats.

    ``sinks`` first positions and the ``recent`` newest ones are never frozen (the newest token must stay:
    llama.cpp continues a sequence from its highest cached position). ``evict`` picks what leaves when
    cells run out; with ``drop`` it is discarded (the irreversible baselines) instead of frozen.
    ``capture`` copies attention tensors out of every decode for ``on_decode``. ``host_ops`` keeps every op on the
    CPU where the weights are (no op sent to a GPU of a GPU build): what :mod:`.recall` needs. ``overlap``: every decode
    runs on the context's decode thread, and a single token's decode that captures nothing runs there while
    ``on_decode`` runs here (:meth:`_decode_beside`).

    Every llama.cpp memory call goes through one method here that also updates the :class:`CellMap`
    mirror (``_decode``, ``_rm``, ``_cp``, ``_rm_at``, ``_cp_at``, ``_add``, ``_land``), so the two cannot drift apart.
    """

    def __init__(
        self,
        model: Model,
        n_ctx: int,
        *,
        flash_attn: bool = False,
        type_k: int = 1,
        type_v: int = 1,
        n_batch: int = 512,
        sinks: int = 4,
        recent: int = 16,
        store_dir: str | Path | None = None,
        keep_store: bool = False,
        evict: Evictor | None = None,
        drop: bool = False,
        shift: bool = False,
        capture: CaptureSpec | None = None,
        on_decode: OnDecode | None = None,
        before_decode: OnDecode | None = None,
        on_copy: OnCopy | None = None,
        host_ops: bool = False,
        overlap: bool = False,
    ) -> None:
        self.model = model
        self.overlap = overlap
        self.capture = Capture(model, capture, n_ctx, n_batch) if capture is not None else None
        cb = (self.capture.callback, self.capture.user_data) if self.capture is not None else (None, None)
        self.ctx = Context(model, ContextConfig(n_ctx, n_batch, flash_attn, type_k, type_v, host_ops=host_ops), *cb,
                           threaded=overlap)
        self.cells = CellMap(self.ctx.n_ctx)
        self.budget = min(n_ctx, self.ctx.n_ctx)
        self.sinks, self.recent = sinks, max(1, recent)
        self.tokens: list[int] = []
        self.evict, self.drop, self.on_decode = evict, drop or shift, on_decode
        self.before_decode, self.on_copy = before_decode, on_copy
        self.shift = shift
        self.shifted = 0  # with shift: how far llama.cpp's positions trail the logical ones
        self.dropped = 0
        n_kv = model.n_head_kv * model.head_dim
        kb, ke = _TYPE_BYTES.get(type_k, (2, 1))
        vb, ve = _TYPE_BYTES.get(type_v, (2, 1))
        self.bytes_per_token = model.n_layer * (n_kv * kb // ke + n_kv * vb // ve)
        self._store_dir, self._keep = store_dir, keep_store
        self.store: FrozenStore | None = None
        self._left: dict[int, int] = {}  # frozen position -> cell it left
        self._gather: RowGather | None = None  # copies of scattered cells on the cache's device
        self._gather_ok = True
        self._gathered: blobfmt.Layout | None = None  # the layout of what the gather copies
        self.freeze_events = self.thaw_events = self.upload_runs = 0
        self.freeze_seconds = self.thaw_seconds = 0.0  # thaw time excludes the freezes that made room
        self.active_peak = 0
        self._active_sum = self._decodes = 0  # active tokens summed after each decode, for the mean
        self.stale_from: int | None = None  # first position decoded while something was frozen
        self._chunks: list[int] = []  # first position of every decode: refresh replays the same batches
        self.recall: Recall | None = None  # frozen tokens lent to each layer inside short decodes (:mod:`.recall`)
        self._recalled_before = (0, 0.0)  # rows and seconds of recall in the sessions this one continues

    # lifecycle
    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self._drop_gather()
        self.ctx.close()

    def _drop_gather(self) -> None:
        if self._gather is not None:
            self._gather.close()
            self._gather, self._gather_ok = None, False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # views
    @property
    def n_logical(self) -> int:
        return len(self.tokens)

    @property
    def n_frozen(self) -> int:
        return self.store.frozen_tokens if self.store is not None else 0

    def active_positions(self) -> np.ndarray:
        cells = self.cells.cells_of(0)
        return np.sort(self.cells.pos[cells])

    def frozen_positions(self) -> np.ndarray:
        return self.store.positions() if self.store is not None else np.zeros(0, np.int64)

    def protected(self, positions: np.ndarray) -> np.ndarray:
        """Mask of positions that must stay active (sinks and the recent window)."""
        return (positions < self.sinks) | (positions >= self.n_logical - self.recent)

    def kv_stats(self) -> KvStats:
        active = len(self.cells.cells_of(0))
        frozen = self.n_frozen
        recalled_rows, recall_seconds = self._recalled()
        return KvStats(
            logical_tokens=self.n_logical,
            active_tokens=active,
            frozen_tokens=frozen,
            active_kv_bytes=active * self.bytes_per_token,
            frozen_kv_bytes=frozen * self.bytes_per_token,
            store_bytes=self.store.frozen_bytes if self.store else 0,
            freeze_events=self.freeze_events,
            thaw_events=self.thaw_events,
            freeze_seconds=self.freeze_seconds,
            thaw_seconds=self.thaw_seconds,
            kv_bytes_per_token=self.bytes_per_token,
            cells=self.ctx.n_ctx,
            active_tokens_peak=self.active_peak,
            active_tokens_mean=self._active_sum / self._decodes if self._decodes else 0.0,
            dropped_tokens=self.dropped,
            upload_runs=self.upload_runs,
            recalled_rows=recalled_rows,
            recall_seconds=recall_seconds,
        )

    def _recalled(self) -> tuple[int, float]:
        """(token, layer) rows recall lent and the seconds it took, counting the sessions this one continues."""
        rows, seconds = self._recalled_before
        if self.recall is not None:
            rows, seconds = rows + self.recall.rows, seconds + self.recall.seconds
        return rows, seconds

    def add_counts(self, other: Session) -> None:
        """Count ``other``'s copies and decodes as this session's (a prompt read again into a fresh session)."""
        self.freeze_events += other.freeze_events
        self.thaw_events += other.thaw_events
        self.upload_runs += other.upload_runs
        self.freeze_seconds += other.freeze_seconds
        self.thaw_seconds += other.thaw_seconds
        self.active_peak = max(self.active_peak, other.active_peak)
        self._active_sum += other._active_sum
        self._decodes += other._decodes
        rows, seconds = self._recalled_before
        other_rows, other_seconds = other._recalled()
        self._recalled_before = (rows + other_rows, seconds + other_seconds)

    # llama.cpp memory calls, each with its cell-map update
    def _decode(self, chunk: list[int], pos0: int, all_logits: bool) -> None:
        self.ctx.decode(chunk, pos0, all_logits=all_logits)
        self.cells.decode(np.arange(pos0, pos0 + len(chunk)))

    def _rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.ctx.seq_rm(seq, p0, p1)
        self.cells.seq_rm(seq, p0, p1)

    def _cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.ctx.seq_cp(src, dst, p0, p1)
        self.cells.seq_cp(src, dst, p0, p1)

    def _rm_at(self, seq: int, positions: np.ndarray) -> None:
        """:meth:`_rm` of every run of these sorted positions; the mirror updated once (a freeze of scattered tokens
        has a run per token, and a mirror update per run cost more than llama.cpp's own call)."""
        for a, b in runs(positions):
            self.ctx.seq_rm(seq, a, b)
        self.cells.seq_rm_at(seq, positions)

    def _cp_at(self, src: int, dst: int, positions: np.ndarray) -> None:
        """:meth:`_cp` of every run of these sorted positions; the mirror updated once."""
        for a, b in runs(positions):
            self.ctx.seq_cp(src, dst, a, b)
        self.cells.seq_cp_at(src, dst, positions)

    def _add(self, seq: int, p0: int, delta: int) -> None:
        self.ctx.seq_add(seq, p0, -1, delta)
        self.cells.seq_add(seq, p0, delta)

    def _land(self, layout: blobfmt.Layout, positions: np.ndarray, targets: np.ndarray,
              sources: Iterable[tuple[Side, np.ndarray, np.ndarray]] = (), pad: int = 0) -> None:
        """Load KV rows into chosen free cells of sequence 0 (thaw, resume) or only move llama.cpp's cell
        search start (``pad`` dummy cells, no positions: head normalisation).

        ``positions[i]`` lands in cell ``targets[i]``; each source ``(side, rows, idx)`` supplies rows ``rows``
        of ``side`` for ``positions[idx]``. The blob is padded with dummy cells in the order llama.cpp's slot
        search visits free cells (:meth:`CellMap.plan_restore`), loaded into the scratch sequence and
        copied to sequence 0. More cells than half a reused blob buffer holds (``BLOB_REUSE_MAX``) land in parts, in
        the order of llama.cpp's search: a resume or a large thaw needs no blob of its whole size, whose fresh pages
        would be faulted in while it is built.
        """
        empty = layout.blob_size(0)
        per = max(1, (BLOB_REUSE_MAX // 2 - empty) // (layout.blob_size(1) - empty))  # the rest: room for padding
        if len(targets) > per:
            plan = self.cells.plan_restore(targets)
            real, where, sources = plan[plan >= 0], np.full(len(positions), -1, np.int64), list(sources)
            for a in range(0, len(real), per):
                part = real[a : a + per]
                where[part] = np.arange(len(part))
                parts = [(side, rows[where[idx] >= 0], where[idx][where[idx] >= 0]) for side, rows, idx in sources]
                self._land(layout, positions[part], targets[part], parts)
                where[part] = -1
            return
        order = self.cells.plan_restore(targets) if len(targets) else np.full(pad, -1, np.int64)
        n, real = len(order), order >= 0
        pos = np.where(real, positions[np.maximum(order, 0)] if len(positions) else 0, DUMMY_POS + np.arange(n))
        raw = empty_blob(layout, pos, SCRATCH_SEQ, self.ctx.blob_buffer(layout.blob_size(n)), zero=not real.any())
        if real.any():
            dst = blob_side(raw, layout, n)
            if not real.all():  # dummies hold zeros, not a reused buffer's old bytes; zeroing all 32 MB took 2 ms
                dummy = np.flatnonzero(~real)
                for layer in range(layout.n_layer):
                    k_view(dst, layout, layer)[dummy] = 0
                    v_view(dst, layout, layer)[dummy] = 0
            slot = np.empty(len(positions), np.int64)
            slot[order[real]] = np.flatnonzero(real)
            for side, rows, idx in sources:
                copy_rows(side, dst, rows, slot[idx], layout)
        self.ctx.state_set(raw, SCRATCH_SEQ)
        landed = self.cells.find_slot(n)
        self.upload_runs += 1 + int(np.count_nonzero(np.diff(landed) != 1)) if n else 0
        if not np.array_equal(landed[real], targets[order[real]]):
            raise LlamaError("internal error: placement plan and cell map disagree")
        self.cells.apply(landed, pos, SCRATCH_SEQ)
        if real.any():
            self._cp(SCRATCH_SEQ, 0, 0, DUMMY_POS)
        self._rm(SCRATCH_SEQ)

    # evaluation
    def eval(self, tokens: Sequence[int], all_logits: bool = False, rest: int = 0) -> np.ndarray:
        """Append ``tokens`` at the next positions; the last token's logits (float32 [n_vocab]).

        With ``all_logits`` the result is [len(tokens), n_vocab], one row per token. ``rest``: tokens of the same
        prompt that later calls bring (recall's prompt tail counts them).
        """
        rows = self.feed(tokens, all_logits, rest)
        return np.stack(rows) if all_logits else self.ctx.logits()

    def feed(self, tokens: Sequence[int], all_logits: bool = False, rest: int = 0) -> list[np.ndarray]:
        """:meth:`eval` without copying out the last token's logits (the runner reads them where it needs them);
        with ``all_logits`` each token's, in order."""
        if len(tokens) == 0:
            raise ValueError("eval needs at least one token")
        rows = []
        step = max(1, min(self.ctx.n_batch, (self.budget - self.sinks - self.recent) // 2))
        for i in range(0, len(tokens), step):
            chunk = list(tokens[i : i + step])
            self.make_room(len(chunk))
            pos0 = self.n_logical - self.shifted
            if self.stale_from is None and self.n_frozen:
                self.stale_from = pos0
            if self.before_decode is not None:
                self.before_decode(self, pos0, len(chunk))
            if self.capture is not None:
                self.capture.reset()
            if self._overlaps(len(chunk), all_logits):
                self._decode_beside(chunk, pos0)
            else:
                if self.recall is not None:
                    self.recall.arm(pos0, len(chunk), len(tokens) - i - len(chunk) + rest)
                try:
                    self._decode(chunk, pos0, all_logits)
                finally:
                    if self.recall is not None:
                        self.recall.finish()
                if self.capture is not None:
                    self.capture.check()
                self._decoded(chunk, pos0)
                if self.on_decode is not None:
                    self.on_decode(self, pos0, len(chunk))
            if all_logits:
                rows += [self.ctx.logits(j) for j in range(len(chunk))]
        return rows

    def _decoded(self, chunk: list[int], pos0: int) -> None:
        """The session's record of a decoded chunk: its tokens, its first position, the active-cell counts."""
        self._chunks.append(pos0)
        self.tokens.extend(chunk)
        active = len(self.cells.cells_of(0))
        self.active_peak = max(self.active_peak, active)
        self._active_sum += active
        self._decodes += 1

    def _overlaps(self, n: int, all_logits: bool) -> bool:
        """Whether this decode runs beside ``on_decode``: one token, with ``overlap``, whose capture copies nothing
        (``on_decode`` then reads no tensor of it: what it reads is the session's mirror and llama.cpp, which waits)."""
        return (self.overlap and self.ctx.threaded and n == 1 and not all_logits and self.recall is None
                and (self.capture is None or not self.capture.enabled))

    def _decode_beside(self, chunk: list[int], pos0: int) -> None:
        """The decode on llama.cpp's side and ``on_decode`` here at once: the mirror and the counts are updated as the
        decode will leave them, and any llama.cpp call ``on_decode`` makes waits for the decode first, so the calls
        reach llama.cpp in the order they do one after the other (tested: the same tokens, logits and scores).

        Why: with a capture callback llama.cpp synchronises after every graph view, so its decode returns only when
        the GPU is done and the host's work after it was on every token's path; without one (full) that work runs
        while the GPU computes. Measured on an H100 host (LLaMA-3-8B shape, 16k, 256-token replies, budget 0.35, one
        process, medians of 3): 136.5 tok/s against 132.2 one after the other, full 139.4 (docs/gpu.md, thirty-third
        session). If the decode fails, the mirror drops the token again (llama.cpp removes a failed
        batch's cells) before the error is raised; an ``on_decode`` cut short by it leaves the session as a failed decode
        does (:attr:`~asrkf_edge.generate.Generation.failed`)."""
        self.ctx.launch(chunk, pos0)
        self.cells.decode(np.arange(pos0, pos0 + 1))
        self._decoded(chunk, pos0)
        try:
            if self.on_decode is not None:
                self.on_decode(self, pos0, 1)
        finally:
            try:
                self.ctx.wait()  # also where on_decode raised: nothing goes on beside a decode
            finally:
                if self.ctx.failed_at == pos0:
                    self.cells.seq_rm(0, pos0, pos0 + 1)
                    del self.tokens[-1]
                    self._chunks.pop()
        if self.capture is not None:
            self.capture.check()

    def refresh(self) -> int:
        """Recompute the KV of tokens decoded while something was frozen, now that nothing is.

        Their K/V were computed without the frozen context; after a full thaw this makes the cache
        what a session that never froze would hold. Returns how many tokens were re-decoded.
        """
        if self.stale_from is None or self.stale_from >= self.n_logical:
            self.stale_from = None
            return 0
        if self.n_frozen:
            raise OutOfCellsError("refresh needs every token active; thaw first")
        start = self.stale_from
        bounds = [p for p in self._chunks if p >= start] + [self.n_logical]
        redo = self.rewind(self.n_logical - start)
        self.stale_from = None
        cells = self.cells.cells_of(0)
        misplaced = np.sort(self.cells.pos[cells][self.cells.pos[cells] % self.cells.size != cells]).astype(np.int64)
        if len(misplaced):  # e.g. a thaw whose home cell a stale token held: move them home too
            self._freeze_positions(misplaced)
            self._restore(misplaced)
        for a, b in zip(bounds, bounds[1:], strict=False):  # same batches as before: same rounding
            self.feed(redo[a - start : b - start])
        return len(redo)

    def rewind(self, n: int) -> list[int]:
        """Drop the newest ``n`` tokens from the cache (they must be active); returns them."""
        if not 0 < n <= self.n_logical:
            raise ValueError(f"cannot rewind {n} of {self.n_logical} tokens")
        start = self.n_logical - n
        if self.store is not None and len(self.store.positions(start, self.n_logical)):
            raise ValueError("cannot rewind over frozen tokens; thaw them first")
        self._rm(0, start - self.shifted, -1)
        gone = self.tokens[start:]
        del self.tokens[start:]
        self._chunks = [p for p in self._chunks if p < start]
        if self.stale_from is not None and self.stale_from >= start:
            self.stale_from = None
        return gone

    def free_cells(self) -> int:
        return self.budget - int(np.count_nonzero(self.cells.seqs))

    def make_room(self, n: int, keep: np.ndarray | None = None) -> None:
        """Freeze (or drop) until ``n`` cells are free, never touching protected positions or ``keep``."""
        short = n - self.free_cells()
        if short <= 0:
            return
        act = self.active_positions()
        if self.shift:
            self._shift(max(short, (len(act) - self.sinks) // 2))
            return
        cand = act[~self.protected(act)]
        if keep is not None and len(keep):
            cand = cand[~np.isin(cand, keep)]
        if len(cand) < short:
            raise OutOfCellsError(
                f"the KV cache has {self.budget} cells and {len(act)} hold tokens that may not be frozen; "
                f"{n} more are needed: raise the budget or lower the protected sink/recent sizes"
            )
        batch = max(short, min(len(cand), self.budget // 16))  # freeze in runs, not one cell per step
        chosen = np.sort(np.asarray(self.evict(self, short, batch, cand) if self.evict else cand[:batch], np.int64))
        if len(chosen) < short:
            raise LlamaError(f"internal error: the evictor chose {len(chosen)} tokens, {short} are needed")
        if self.drop:
            self.discard(chosen)
        else:
            self._freeze_positions(chosen)

    def cells_of(self, positions: np.ndarray) -> np.ndarray:
        """The cell holding each of these active positions. Through a table by position: sorting the cells' positions
        took 287 us for 5,700 cells against 52 (2-core EPYC), on every key read-back, freeze and thaw."""
        held = self.cells.cells_of(0)
        pos = self.cells.pos[held]
        cell = np.full(int(pos.max(initial=-1)) + 1, -1, np.int64)
        cell[pos] = held
        return cell[np.asarray(positions, np.int64)]

    def cell_positions(self) -> np.ndarray:
        """Position held by each cell for sequence 0, -1 where the cell holds none."""
        return np.where(self.cells.seqs & 1, self.cells.pos, -1).astype(np.int64)

    def discard(self, positions: np.ndarray) -> None:
        """Remove active tokens for good (what the irreversible baselines do instead of freezing)."""
        self._rm_at(0, positions)
        self.dropped += len(positions)

    def _shift(self, n: int) -> None:
        """llama.cpp's context shift: drop the ``n`` tokens after the sinks and renumber the rest down."""
        keep = self.sinks
        if n > self.n_logical - self.shifted - keep - 1:
            raise OutOfCellsError(f"the KV cache has {self.budget} cells; context shift cannot free {n}")
        self._rm(0, keep, keep + n)
        self._add(0, keep + n, -n)
        self.shifted += n
        self.dropped += n

    # freeze / thaw
    def freeze(self, p0: int, p1: int) -> int:
        """Move active tokens in [p0, p1) to the store (protected ones stay); returns how many moved."""
        act = self.active_positions()
        return self.freeze_positions(act[(act >= p0) & (act < p1)])

    def freeze_positions(self, positions: np.ndarray) -> int:
        """Move these active positions to the store (protected and inactive ones are skipped)."""
        act = self.active_positions()
        sel = np.unique(np.asarray(positions, np.int64))
        sel = sel[np.isin(sel, act)]
        sel = sel[~self.protected(sel)]
        self._freeze_positions(sel)
        return len(sel)

    def thaw(self, p0: int, p1: int) -> int:
        """Bring frozen tokens in [p0, p1) back into the cache; returns how many came back."""
        if self.store is None:
            return 0
        return self.thaw_positions(self.store.positions(p0, p1))

    def thaw_positions(self, positions: np.ndarray, packed: bool = False) -> int:
        """Bring these frozen positions back (others are ignored), making room if needed; returns the count.

        By default each token goes home (the cell it would hold had nothing been frozen), so thawing everything
        gives back the never-frozen cache bit for bit. ``packed`` puts them in the first free cells llama.cpp's
        search meets instead: no padding cells and fewer runs of cells, so fewer and smaller uploads (one per
        run, layer and K/V); attention then sums the same rows in another order, so later logits round
        differently. For a policy's thaws, whose effect on the logits is far larger than that rounding."""
        if self.store is None or len(positions) == 0:
            return 0
        want = np.unique(np.asarray(positions, np.int64))
        want = want[self.store.is_frozen(want)]
        if len(want) == 0:
            return 0
        self.make_room(len(want), keep=want)
        self._restore(want, packed)
        return len(want)

    def peek(self, positions: np.ndarray) -> blobfmt.Parsed:
        """The KV rows of these active positions, copied out and left in place (``on_copy`` sees them).

        The arrays view staging memory: valid until the next copy out."""
        self._cp_at(0, SCRATCH_SEQ, np.unique(np.asarray(positions, np.int64)))
        try:
            _, parsed = self._copy_out()
        finally:
            self._rm(SCRATCH_SEQ)
        return parsed

    def read_keys(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Every layer's K rows of these active positions, gathered from llama.cpp's K cache on its device and
        copied to the host at once: (positions, uint8 [layers, n, row bytes] in that order, ggml type). A
        :meth:`peek` copies V too, through the scratch sequence, one copy per run of cells, layer, K and V. None
        until the capture knows the cache's tensors (a first decode), or without a capture."""
        gather = self._gatherer()
        if gather is None:
            return None
        pos = np.unique(np.asarray(positions, np.int64))
        self.ctx.wait_rows(int(pos[-1]) + 1 if len(pos) else 0)  # the gather runs on a stream of its own
        try:
            rows = gather(self.cells_of(pos), len(gather.rows) // 2)
        except ValueError as e:  # this device cannot: the state API from now on
            log.info("KV rows copied through llama.cpp's state API: %s", e)
            self._drop_gather()
            return None
        assert self._gathered is not None
        return pos, rows, self._gathered.k_type

    def _copy_out(self) -> tuple[np.ndarray, blobfmt.Parsed]:
        """The scratch sequence's state blob, parsed and checked against the cell map."""
        raw = self.ctx.state_get(SCRATCH_SEQ)
        parsed = blobfmt.parse(raw)
        if not np.array_equal(self.cells.pos[self.cells.cells_of(SCRATCH_SEQ)], parsed.pos):
            raise LlamaError("internal error: KV cell map out of sync with llama.cpp")
        if self.on_copy is not None:
            self.on_copy(parsed.pos.astype(np.int64), parsed)
        return raw, parsed

    def _freeze_positions(self, positions: np.ndarray) -> None:
        if len(positions) == 0:
            return
        t0 = time.perf_counter()
        positions = self._freeze_gathered(positions)
        if len(positions):
            self._cp_at(0, SCRATCH_SEQ, positions)
            try:
                cells = self.cells.cells_of(SCRATCH_SEQ)
                raw, parsed = self._copy_out()
                order = np.argsort(parsed.pos, kind="stable")
                pos = parsed.pos[order].astype(np.int64)
                toks = np.asarray(self.tokens, np.int32)[pos]
                self._store_for(parsed.layout).put(pos, toks, blob_side(raw, parsed.layout, len(pos)), order)
            finally:
                self._rm(SCRATCH_SEQ)
            for p, c in zip(pos.tolist(), cells[order].tolist(), strict=True):
                self._left[p] = c
            self._rm_at(0, positions)
        self.freeze_events += 1
        self.freeze_seconds += time.perf_counter() - t0

    def _store_for(self, layout: blobfmt.Layout) -> FrozenStore:
        """The session's store, made at the first freeze (of rows of this layout); where the layers are on a GPU, the
        cores left idle while it decodes fault the store's pages in ahead (FrozenStore's ``prefault``)."""
        if self.store is None:
            self.store = FrozenStore(layout, self._store_dir, self._keep, self.model.offloaded)
        return self.store

    def _freeze_gathered(self, positions: np.ndarray) -> np.ndarray:
        """Freeze with the K and V rows gathered on the cache's device (:mod:`.gather`) straight into the store, no
        scratch sequence or state blob: one transfer however scattered the cells (the state API makes one per run
        of cells, layer, K and V), per ``RowGather.MAX_CELLS`` cells. Returns the positions left for the state API:
        all of them where it must do it: V transposed (flash attention off), the
        cache's tensors not known yet, a device that cannot gather, or a cache on the CPU with fewer than
        ``_CPU_GATHER_RUNS`` runs of cells (measured on 2 EPYC cores, default model, benchmarks/freeze_thaw.py
        --flash-attn [--gather]: 400 cells in a row 4.9-5.4 µs a token through the state API, 6.7-8.8 gathered;
        60 scattered cells 0.78-0.85 ms against 0.58-0.66)."""
        gather = self._gatherer()
        pos = np.unique(np.asarray(positions, np.int64))
        if gather is None or not self.ctx.cfg.flash_attn:
            return pos
        cells = self.cells_of(pos)
        if gather.device == "CPU" and len(runs(np.sort(cells))) < _CPU_GATHER_RUNS:
            return pos
        layout = self._gathered
        assert layout is not None
        if self.store is not None and self.store.layout != layout:
            return pos
        self.ctx.wait_rows(int(pos[-1]) + 1)  # the gather runs on a stream of its own, beside a decode of later positions
        n_layer, tokens = layout.n_layer, np.asarray(self.tokens, np.int32)
        for a in range(0, len(pos), gather.MAX_CELLS):  # each part frozen whole: stored, then out of the cache
            part, at = pos[a : a + gather.MAX_CELLS], cells[a : a + gather.MAX_CELLS]
            try:
                flat, offsets = gather.gather(at)
            except ValueError as e:  # this device cannot: the state API from now on
                log.info("KV rows copied through llama.cpp's state API: %s", e)
                self._drop_gather()
                return pos[a:]
            side = Side(flat, offsets[:n_layer], offsets[n_layer:], len(part), False, layout.k_row, layout.v_row)
            self._store_for(layout).put(part, tokens[part], side, np.arange(len(part)))
            if self.on_copy is not None:
                rows = gather.split(flat, offsets, len(part))
                self.on_copy(part, blobfmt.Parsed(layout, part.astype(np.int32), rows[:n_layer], rows[n_layer:]))
                del rows
            del flat, side  # the gather's reused buffer serves the next part only once no view of it is left
            for p, c in zip(part.tolist(), at.tolist(), strict=True):
                self._left[p] = c
            self._rm_at(0, part)
        return pos[:0]

    def _gatherer(self) -> RowGather | None:
        """The gather over every layer's K then V cache tensor, made once the capture has seen them; None before,
        without a capture, or for good where the cache's device cannot run it or its layers differ in type or row
        size (the state API then copies)."""
        if self._gather is None and self._gather_ok and self.capture is not None:
            tensors = self.capture.cache_tensors()
            if tensors is not None:
                n_layer = len(tensors) // 2
                try:
                    if len({kind[1:] for kind in tensors[:n_layer]}) != 1 or len({kind[1:] for kind in tensors[n_layer:]}) != 1:
                        raise ValueError("layers whose KV cache rows differ in type or size")
                    self._gather = RowGather([t for t, _, _ in tensors], self.ctx.n_ctx)
                    (_, k_type, k_row), (_, v_type, v_row) = tensors[0], tensors[-1]
                    self._gathered = blobfmt.Layout(n_layer, k_type, k_row, v_type, v_row, False, 0)
                except ValueError as e:
                    log.info("KV rows copied through llama.cpp's state API: %s", e)
                    self._gather_ok = False
        return self._gather

    def _targets(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cells for thawed positions: home (position mod cells) or the cell left, same SIMD lane, any.

        Returns (targets, evicted): active tokens sitting in a home cell that is not theirs are moved
        to their own free home cell too, so a thaw after decodes restores the never-frozen layout.
        """
        size = self.cells.size
        taken = self.cells.seqs != 0
        targets = np.full(len(want), -1, dtype=np.int64)
        evict: list[int] = []
        for i, p in enumerate(want.tolist()):
            home = p % size
            if not taken[home]:
                targets[i] = home
            elif self.cells.seqs[home] == 1 and (q := int(self.cells.pos[home])) % size != home \
                    and not taken[q % size]:
                evict.append(q)
                targets[i] = home
                taken[q % size] = True
            elif not taken[c := self._left[p]]:
                targets[i] = c
            else:
                continue
            taken[targets[i]] = True
        for i in np.flatnonzero(targets < 0).tolist():
            free = np.flatnonzero(~taken)
            if len(free) == 0:
                raise OutOfCellsError("no free cell left to thaw into")
            lane = free[free % LANE == (int(want[i]) % size) % LANE]
            targets[i] = lane[0] if len(lane) else free[0]
            taken[targets[i]] = True
        return targets, np.asarray(evict, np.int64)

    def _restore(self, want: np.ndarray, packed: bool = False) -> None:
        t0, frozen0 = time.perf_counter(), self.freeze_seconds
        targets, evicted = (self.cells.find_slot(len(want)), want[:0]) if packed else self._targets(want)
        if len(evicted):
            self._freeze_positions(np.sort(evicted))
            want = np.concatenate([want, evicted])
            targets = np.concatenate([targets, evicted % self.cells.size])
        store = self.store
        assert store is not None
        self._land(store.layout, want, targets, store.read(want))
        store.release(want)
        for p in want.tolist():
            self._left.pop(p, None)
        self.thaw_events += 1
        self.thaw_seconds += time.perf_counter() - t0 - (self.freeze_seconds - frozen0)

    # saving and resuming
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this session in a fresh context of the same size: tokens, the cell
        map, counters, the active KV (llama.cpp's blob of sequence 0) and the frozen store.

        First moves llama.cpp's cell search start down to the lowest free cell (what a restore reaches), so
        this session and one rebuilt from the state continue identically."""
        if len(self.cells.cells_of(SCRATCH_SEQ)):
            raise LlamaError("internal error: scratch sequence not empty")
        active = None
        if len(self.cells.cells_of(0)):
            active = self.ctx.state_get(0).copy()
            parsed = blobfmt.parse(active)
            if not np.array_equal(parsed.pos, self.cells.pos[self.cells.cells_of(0)]):
                raise LlamaError("internal error: KV cell map out of sync with llama.cpp")
            self._normalize_head(parsed.layout)
        left = sorted(self._left.items())
        recalled_rows, recall_seconds = self._recalled()
        return {
            "tokens": np.asarray(self.tokens, np.int32),
            "cell_pos": self.cells.pos.copy(),
            "cell_seqs": self.cells.seqs.copy(),
            "head": self.cells.head,
            "chunks": np.asarray(self._chunks, np.int64),
            "left": np.asarray(left, np.int64).reshape(len(left), 2),
            "counters": {"shifted": self.shifted, "dropped": self.dropped, "freeze_events": self.freeze_events,
                         "thaw_events": self.thaw_events, "upload_runs": self.upload_runs, "freeze_seconds": self.freeze_seconds,
                         "thaw_seconds": self.thaw_seconds, "active_peak": self.active_peak,
                         "active_sum": self._active_sum, "decodes": self._decodes, "stale_from": self.stale_from,
                         "recalled_rows": recalled_rows, "recall_seconds": recall_seconds},
            "active": active,
            "store": self.store.state() if self.store is not None else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Rebuild a fresh session (same cell count) from :meth:`state`: every active token lands in the
        cell it held, so logits continue bit for bit."""
        if self.n_logical or len(self.cells.cells_of(0)):
            raise LlamaError("load_state needs a fresh session")
        if self.capture is not None:
            self._learn_cache()
        saved_pos, saved_seqs = state["cell_pos"], state["cell_seqs"]
        if len(saved_pos) != self.cells.size:
            raise LlamaError(f"saved with {len(saved_pos)} KV cells, this context has {self.cells.size}")
        cells0 = np.flatnonzero(saved_seqs & 1)
        if len(cells0):
            raw = state["active"]
            parsed = blobfmt.parse(raw)
            if not np.array_equal(parsed.pos, saved_pos[cells0]):
                raise LlamaError("the saved active KV does not match the saved cell map")
            n0 = len(cells0)
            idx = np.arange(n0, dtype=np.int64)
            self._land(parsed.layout, saved_pos[cells0].astype(np.int64), cells0, [(blob_side(raw, parsed.layout, n0), idx, idx)])
        if not (np.array_equal(self.cells.seqs, saved_seqs) and np.array_equal(self.cells.pos, saved_pos)):
            raise LlamaError("internal error: restored cell map differs from the saved one")
        if _effective_head(saved_seqs, int(state["head"])) != _effective_head(self.cells.seqs, self.cells.head):
            log.warning("resumed cell search start %d differs from the saved %d: later cells may differ",
                        self.cells.head, state["head"])
        self.tokens = state["tokens"].astype(np.int64).tolist()
        self._chunks = state["chunks"].astype(np.int64).tolist()
        self._left = {int(p): int(c) for p, c in state["left"].tolist()}
        c = state["counters"]
        self.shifted, self.dropped = int(c["shifted"]), int(c["dropped"])
        self.freeze_events, self.thaw_events = int(c["freeze_events"]), int(c["thaw_events"])
        self.upload_runs = int(c.get("upload_runs", 0))  # chats saved before it was counted: from 0
        self.freeze_seconds, self.thaw_seconds = float(c["freeze_seconds"]), float(c["thaw_seconds"])
        self.active_peak, self._active_sum, self._decodes = int(c["active_peak"]), int(c["active_sum"]), int(c["decodes"])
        self.stale_from = None if c["stale_from"] is None else int(c["stale_from"])
        self._recalled_before = (int(c.get("recalled_rows", 0)), float(c.get("recall_seconds", 0.0)))  # before: from 0
        if state["store"] is not None:
            self.store = FrozenStore.from_state(state["store"], self._store_dir, self._keep, self.model.offloaded)

    def _learn_cache(self) -> None:
        """Let the capture note llama.cpp's K and V cache tensors (it finds them in a decode's graph) before anything
        is restored: one token decoded in the scratch sequence of the empty cache and removed, which leaves the cells
        and the search start as they were. Without it a resumed chat read its next message without recall (no cache
        tensors to lend rows through yet) where the chat it continues lent 391 rows, and answered otherwise."""
        self.ctx.decode([0], 0, seq=SCRATCH_SEQ)
        self.ctx.seq_rm(SCRATCH_SEQ, -1, -1)

    def _normalize_head(self, layout: blobfmt.Layout) -> None:
        """Move llama.cpp's search start down to the lowest free cell (what a restore leaves), via dummy cells."""
        cells = self.cells
        free = np.flatnonzero(cells.seqs == 0)
        if not len(free) or cells.head <= free[0]:
            return
        low = int(free[0])
        n = 1 if cells.head > cells.used + 2 else int(np.flatnonzero(cells.free_order(cells.head) == low)[0]) + 1
        self._land(layout, np.zeros(0, np.int64), np.zeros(0, np.int64), pad=n)
        if cells.head != low:
            raise LlamaError(f"internal error: cell search start is {cells.head}, expected {low}")


def _effective_head(cells_seqs: np.ndarray, head: int) -> int:
    """llama.cpp's search start as it behaves: a head at or below the lowest free cell acts as that cell."""
    free = np.flatnonzero(cells_seqs == 0)
    return int(free[0]) if len(free) and head <= free[0] else head
