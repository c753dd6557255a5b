"""The blob format, the native row copy and its NumPy twin, and thaw placement planning."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
from pagemap import mapped

from asrkf_edge import blob as blobfmt
from asrkf_edge.cells import CellMap
from asrkf_edge.kvcopy import blob_side, copy_rows, empty_blob, k_view, native_available, segment_side, slot_side
from asrkf_edge.llama import SCRATCH_SEQ


@pytest.mark.parametrize("flash_attn", [False, True])
def test_blob_rebuilt_byte_for_byte(tiny, flash_attn):
    """Parse a real blob, copy its rows into a new one, also one built in reused memory: identical bytes, V
    transposed or not."""
    from asrkf_edge.session import Session

    with Session(tiny.model, 256, flash_attn=flash_attn) as s:
        s.eval(tiny.tokenize("the sky is blue and the grass is green"))
        s.ctx.seq_cp(0, SCRATCH_SEQ, 3, 11)
        raw = s.ctx.state_get(SCRATCH_SEQ)
    p = blobfmt.parse(raw)
    assert p.layout.v_trans == (not flash_attn)
    assert p.pos.tolist() == list(range(3, 11))
    n = len(p.pos)
    fresh = empty_blob(p.layout, p.pos, SCRATCH_SEQ)

    def dirty() -> np.ndarray:  # a reused buffer, longer than the blob, holding old bytes
        return np.full(p.layout.blob_size(n) + 100, 0xAB, np.uint8)

    assert empty_blob(p.layout, p.pos, SCRATCH_SEQ, dirty()).tobytes() == fresh.tobytes()
    for native in ([False, True] if native_available() else [False]):
        for buf in (None, dirty()):  # every cell's rows written: a reused buffer needs no clearing
            out = empty_blob(p.layout, p.pos, SCRATCH_SEQ, buf, zero=buf is None)
            copy_rows(blob_side(raw, p.layout, n), blob_side(out, p.layout, n), np.arange(n), np.arange(n), p.layout, native=native)
            assert out.tobytes() == raw.tobytes()


@pytest.mark.skipif(not native_available(), reason="native piece not built")
@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("v_el", [1, 2, 4])  # the native piece has its own loops for 2- and 4-byte elements
@pytest.mark.parametrize("store", ["slots", "segments"])  # the store's slots, format 2's segments
@pytest.mark.parametrize("threads", [1, 3])  # a large copy is split over threads, rows apart
def test_native_matches_numpy(v_trans, v_el, store, threads, monkeypatch):
    from asrkf_edge import kvcopy

    monkeypatch.setattr(kvcopy, "_THREADS", threads)
    monkeypatch.setattr(kvcopy, "_PARALLEL_MIN", 1)
    rng = np.random.default_rng(0)
    layout = blobfmt.Layout(n_layer=3, k_type=1, k_row=16, v_type=1, v_row=24, v_trans=v_trans, v_el=v_el)
    n_src, n_dst = 45, 61
    src = blob_side(rng.integers(0, 255, layout.blob_size(n_src), dtype=np.uint8), layout, n_src)
    src_rows = np.concatenate([np.arange(3, 20), rng.permutation(np.arange(20, n_src))[:20]])  # a run, then scattered
    dst_rows = rng.permutation(n_dst)[: len(src_rows)]  # 37 rows: the native piece's transposed V moves 16 at a time
    outs = []
    for native in (False, True):
        if store == "slots":
            seg = slot_side(np.zeros(n_dst * 128, np.uint8), layout, 128)  # 120 bytes a token, 64-byte aligned
        else:
            seg = segment_side(np.zeros(n_dst * layout.bytes_per_cell, np.uint8), layout, n_dst)
        copy_rows(src, seg, src_rows, dst_rows, layout, native=native)
        back = blob_side(np.zeros(layout.blob_size(n_src), np.uint8), layout, n_src)
        copy_rows(seg, back, dst_rows, src_rows, layout, native=native)
        outs.append((seg.buf.copy(), back.buf.copy()))
        # round trip restores exactly the copied rows' bytes
        assert np.array_equal(blobfmt_rows(back, layout, src_rows), blobfmt_rows(src, layout, src_rows))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


def blobfmt_rows(side, layout, rows):
    from asrkf_edge.kvcopy import k_view, v_view

    ks = [k_view(side, layout, i)[rows] for i in range(layout.n_layer)]
    vs = [v_view(side, layout, i)[rows] for i in range(layout.n_layer)]
    return np.concatenate([np.concatenate([k.ravel() for k in ks]), np.concatenate([v.ravel() for v in vs])])


def test_plan_restore_lands_on_targets():
    """Replaying the plan through the mirror's own search puts every real cell on its target."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = CellMap(64)
        m.decode(np.arange(50))
        for p0 in rng.choice(46, size=3, replace=False):
            m.seq_rm(0, int(p0), int(p0) + int(rng.integers(1, 5)))
        free = np.flatnonzero(m.seqs == 0)
        targets = rng.choice(free, size=int(rng.integers(1, min(6, len(free)) + 1)), replace=False)
        order = m.plan_restore(targets)
        landed = m.find_slot(len(order))
        assert np.array_equal(landed[order >= 0], targets[order[order >= 0]])


def test_find_slot_takes_the_first_free_cells_in_llama_cpp_s_search_order():
    """The near-head shortcut gives what the whole ring-order scan gives, whether the cells are near or not."""
    rng = np.random.default_rng(3)
    for _ in range(500):
        size = int(rng.integers(1, 1200))
        m = CellMap(size)
        m.seqs[:] = rng.random(size) < rng.random()
        m.head = int(rng.integers(0, size + 1))
        n = int(rng.integers(1, 400))
        order = m.free_order(m.search_start(n))
        if len(order) < n:
            with pytest.raises(ValueError):
                m.find_slot(n)
        else:
            assert np.array_equal(m.find_slot(n), order[:n])


def test_large_slots_hash_the_same_on_threads(tmp_path, monkeypatch):
    """Slots over 64 KB are hashed on several threads: the same hashes as one thread, and a damaged slot is still
    found on read."""
    from asrkf_edge import kvcopy
    from asrkf_edge.errors import StoreError
    from asrkf_edge.store import FrozenStore

    layout = blobfmt.Layout(n_layer=2, k_type=1, k_row=20000, v_type=1, v_row=20000, v_trans=False, v_el=0)
    n = 9
    src = blob_side(np.random.default_rng(2).integers(0, 255, layout.blob_size(n), dtype=np.uint8), layout, n)
    got = []
    for threads in (1, 3):
        monkeypatch.setattr(kvcopy, "_THREADS", threads)
        monkeypatch.setattr(kvcopy, "_PARALLEL_MIN", 1)
        store = FrozenStore(layout, tmp_path / f"t{threads}")
        store.put(np.arange(n), np.zeros(n, np.int32), src, np.arange(n))
        arena = next(iter(store._arenas.values()))
        got.append(arena.hashes(np.arange(n)))
        arena.mm[store._slot[7] * store.slot_bytes + 5] ^= 1
        with pytest.raises(StoreError, match="corrupt"):
            store.read(np.arange(n))
        store.close()
    assert np.array_equal(got[0], got[1]) and len(set(got[0].tolist())) == n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are faulted in ahead on Linux only")
def test_arena_pages_are_faulted_in_before_freezes_write_them(tmp_path):
    """The next freezes write pages already faulted in (a fresh page's fault made a freeze of the LLaMA-3-8B shape
    10x slower), and faulting them in leaves the frozen bytes as they were."""
    from asrkf_edge import pages
    from asrkf_edge import store as st

    layout = blobfmt.Layout(n_layer=2, k_type=1, k_row=4000, v_type=1, v_row=4000, v_trans=False, v_el=0)
    store = st.FrozenStore(layout, tmp_path, prefault=True)  # as where the layers are on a GPU
    n = 40
    src = blob_side(np.random.default_rng(5).integers(0, 255, layout.blob_size(n), dtype=np.uint8), layout, n)
    store.put(np.arange(n), np.arange(n, dtype=np.int32), src, np.arange(n))
    pages.prefaulter().submit(int).result()  # the faults asked for so far are done
    if not pages.populate_ok:
        pytest.skip("this kernel or file system cannot fault pages in ahead (MADV_POPULATE_WRITE)")
    arena = next(iter(store._arenas.values()))
    faulted = mapped(arena.mm)
    assert faulted[: (n + st._AHEAD // 2) * store.slot_bytes // mmap.PAGESIZE].all()
    assert arena.size > (n + st._AHEAD + 64) * store.slot_bytes and not faulted[-8:].any()  # and not the whole file
    (side, slots, idx), = store.read(np.arange(n))
    for layer in range(layout.n_layer):
        assert np.array_equal(k_view(side, layout, layer)[slots], k_view(src, layout, layer)[idx])
    store.close()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_quantized_key_rows_read_as_gguf_dequantizes_them(kind):
    """The key mirror reads q8_0 and q4_0 cache rows (blocks of 32 values, an f16 scale each) as gguf's reference
    dequantization does, to the bit once rounded to f16."""
    import warnings

    from gguf import GGMLQuantizationType, quants

    t = getattr(GGMLQuantizationType, kind)
    block = {"Q8_0": 34, "Q4_0": 18}[kind]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (50, 6 * block), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (50, 6)).astype(np.float16)
    for b in range(6):
        raw[:, b * block : b * block + 2] = scales[:, b : b + 1].view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = quants.dequantize(raw, t).astype(np.float16)
    got = blobfmt.rows_as_f16(raw, int(t))
    assert got.shape == (50, 192) and np.array_equal(got, want)
