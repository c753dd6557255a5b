"""Attention capture and importance kernels: Numba against NumPy, native against Python, softmax against Q.K."""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from pagemap import mapped
from scoring import greedy, observed_scores, rank_overlap
from tiny_gguf import write_tiny_llama

from asrkf_edge import Engine, importance, pages
from asrkf_edge import capture as capture_mod
from asrkf_edge import llama as llama_mod
from asrkf_edge import runner as runner_mod
from asrkf_edge import session as session_mod
from asrkf_edge.capture import CaptureSpec
from asrkf_edge.errors import LlamaError
from asrkf_edge.gather import RowGather
from asrkf_edge.importance import (
    Importance,
    QueryWindow,
    attention_mass,
    attention_mass_reference,
    entropy,
    entropy_reference,
    exp_shifted,
    f16_to_f32,
    fold,
    fold_reference,
    head_scores,
    head_scores_reference,
    keys_to_f16,
    layer_mass,
    layer_mass_reference,
    pick_swaps,
    pick_swaps_reference,
)
from asrkf_edge.policies import AsrKf, make_policy
from asrkf_edge.runner import Runner
from asrkf_edge.session import Session

TEXT = "The grass is green. The sky is blue. The pass key is 4242. Remember it. Here we go, there and back again. "


def test_kernels_reuse_their_scratch_without_touching_earlier_results() -> None:
    """The kernels write softmax rows into a per-thread scratch kept between calls: a result handed out must not
    change when the next call (smaller or larger, serial or parallel) reuses that scratch."""
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2, 400, 2, 16)).astype(np.float16).view(np.uint16)
    calls = [(rng.standard_normal((2, r, 4, 16)).astype(np.float32), np.arange(n, dtype=np.int64))
             for r, n in ((3, 390), (1, 50), (6, 400))]
    for parallel in (False, True):
        got = [(attention_mass(q, np.full(len(q[0]), 399), keys, kpos, 0.25, parallel),
                head_scores(q, np.full(len(q[0]), 399), keys, kpos, 0.25, parallel)) for q, kpos in calls]
        for (q, kpos), (mass, heads) in zip(calls, got, strict=True):
            qpos = np.full(len(q[0]), 399)
            assert np.abs(mass - attention_mass_reference(q, qpos, keys, kpos, 0.25)).max() < 1e-5
            assert np.abs(heads - head_scores_reference(q, qpos, keys, kpos, 0.25)).max() < 1e-5


@numba.njit
def _by_instruction(h: np.ndarray, out: np.ndarray) -> None:
    for i in range(len(h)):
        out[i] = importance._fpext_half(h[i])


@numba.njit
def _by_bits(h: np.ndarray, out: np.ndarray) -> None:
    for i in range(len(h)):
        out[i] = importance._half_by_bits(h[i])


def _converted(convert, h: np.ndarray) -> np.ndarray:  # noqa: ANN001
    out = np.empty(len(h), np.float32)
    convert(h, out)
    return out.view(np.uint32)


def test_kernels_match_numpy_references() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 5, 6, 16)).astype(np.float32)
    keys = rng.standard_normal((3, 300, 2, 16)).astype(np.float16).view(np.uint16)  # a mirror: f16 bits by position
    kpos = rng.permutation(np.arange(100, 240)).astype(np.int64)  # two blocks of decoded keys and part of a third
    qpos = np.arange(200, 205, dtype=np.int64)  # some keys lie in each query's future
    want = attention_mass_reference(q, qpos, keys, kpos, 0.25)
    got = attention_mass(q, qpos, keys, kpos, 0.25)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(attention_mass(q, qpos, keys, kpos, 0.25, parallel=True) - want).max() < 1e-5
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert got[0, kpos > 200].max() == 0.0  # causal
    picks = np.array([2, 0])  # query layers scored against these key layers, read in place
    ref = attention_mass_reference(q[:2], qpos, keys[picks], kpos, 0.25)
    for parallel in (False, True):
        assert np.abs(attention_mass(q[:2], qpos, keys, kpos, 0.25, parallel, picks) - ref).max() < 1e-5
    heads = head_scores_reference(q, qpos, keys, kpos, 0.25)  # [layers x heads, keys], summed over the 5 rows
    for parallel in (False, True):
        assert np.abs(head_scores(q, qpos, keys, kpos, 0.25, parallel=parallel) - heads).max() < 1e-5
    assert np.allclose(heads.sum(axis=1), 5.0, atol=1e-4)
    assert np.allclose(heads.reshape(3, 6, -1).mean(axis=(0, 1)), want.sum(axis=0), atol=1e-5)  # the same attention
    for layer in range(3):  # recall's one-layer kernel: every key row once, all its KV heads together
        one = layer_mass(q[layer], qpos, keys, layer, kpos, 0.25)
        assert np.abs(one - layer_mass_reference(q[layer], qpos, keys, layer, kpos, 0.25)).max() < 1e-5
        assert np.allclose(one, heads.reshape(3, 6, -1)[layer].sum(axis=0), atol=1e-4)

    for heads, rows in ((8, 1), (10, 2)):  # 4 and 5 query rows to a KV head: the three-row dot's remainders
        q4 = rng.standard_normal((rows, heads, 16)).astype(np.float32)
        got = layer_mass(q4, qpos[:rows], keys, 1, kpos, 0.25)
        assert np.abs(got - layer_mass_reference(q4, qpos[:rows], keys, 1, kpos, 0.25)).max() < 1e-5

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # each float16: normal, subnormal, zero, inf, nan
    want = every.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    for convert in (_by_instruction, _by_bits) if importance._hardware_f16() else (_by_bits,):  # no F16C: no link
        got = _converted(convert, every).view(np.float32)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # exact, -0 and subnormals too
        assert np.isnan(got[nan]).all() and np.array_equal(np.signbit(got[nan]), np.signbit(want[nan]))
        if convert is _by_bits:
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # integer steps: nan payloads too
    bits = np.empty((1024, 64), np.uint32)
    order = rng.permutation(1024)  # rows gathered by position, in any order
    f16_to_f32(every.reshape(1, 1024, 1, 64), 0, order, 0, bits)
    rows_nan = nan.reshape(1024, 64)[order]
    assert np.array_equal(bits[~rows_nan], want.reshape(1024, 64)[order][~rows_nan].view(np.uint32))

    for trial in range(200):  # recall's exchange: ties (drawn from a few values) broken by index, as lexsort does
        n, size = int(rng.integers(2, 300)), int(rng.integers(1, 80))
        nf = int(rng.integers(0, n + 1))
        m = (rng.integers(0, 20, n) / 7 if trial % 2 else rng.random(n)).astype(np.float32)
        top, low = np.empty(size, np.int64), np.empty(size, np.int64)
        ratio = (1.0, 4.0)[trial % 4 // 2]
        gain = pick_swaps(m, nf, size, top, low, ratio)
        want_top, want_low, want_gain = pick_swaps_reference(m, nf, size, ratio)
        k = len(want_top)
        assert (gain, top[:k].tolist(), low[:k].tolist()) == (want_gain, want_top.tolist(), want_low.tolist())

    mass = rng.random((5, 140)).astype(np.float32)
    cells = np.where(rng.random(140) < 0.2, -1, kpos)
    a, b = np.full(300, 0.01, np.float32), np.full(300, 0.01, np.float32)
    fold(a, mass, cells, qpos, 0.9, 0.1)
    fold_reference(b, mass, cells, qpos, 0.9, 0.1)
    assert np.abs(a - b).max() < 1e-6
    assert a[kpos[cells < 0]].tolist() == [np.float32(0.01)] * int((cells < 0).sum())  # no token there

    for logits in (rng.standard_normal(49152).astype(np.float32) * 5, rng.standard_normal(128256).astype(np.float32) * 10,
                   np.zeros(7, np.float32)):
        assert abs(entropy(logits) - entropy_reference(logits)) < 1e-5
    assert abs(entropy(np.zeros(7, np.float32)) - np.log(7)) < 1e-6
    banned = rng.standard_normal(1000).astype(np.float32) * 3
    banned[::3] = -np.inf  # a logit bias that bans tokens: zero probability, not NaN
    assert abs(entropy(banned) - entropy_reference(banned)) < 1e-5


def test_keys_reach_the_mirror_rounded_as_numpy_rounds_them() -> None:
    """The key mirror's float32 -> float16 kernel gives NumPy's cast bit for bit on every finite float (random bit
    patterns, and every 7th float of the range where halves are subnormal or round to zero), infinity beyond 65504,
    NaN for NaN; a destination it cannot write in place is refused."""
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32),
                        np.arange(0x30000000, 0x39000000, 7, dtype=np.uint32)]).view(np.float32)
    x = np.concatenate([x, -x, np.array([0.0, 65504.0, 65519.99, 65520.0, 1.00048828125, 1.00146484375], np.float32)])
    out = np.empty(len(x), np.float16)
    keys_to_f16(x, out)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    keep = ~np.isnan(x)
    assert np.array_equal(out.view(np.uint16)[keep], ref.view(np.uint16)[keep])
    assert np.isnan(out[~keep]).all() and (~keep).any()
    mirror = np.zeros((2, 10, 6), np.float16)
    keys_to_f16(np.arange(18, dtype=np.float32).reshape(3, 2, 3) / 8, mirror[1, 4:7])
    assert mirror[1, 4:7].ravel().tolist() == (np.arange(18) / 8).tolist() and not mirror[0].any()
    with pytest.raises(ValueError, match="contiguous"):
        keys_to_f16(np.zeros(6, np.float32), mirror[:, 0, :3])


def _captured(engine, use_native: bool, tokens: list[int], flash_attn: bool = False):
    """Decode ``tokens`` in one batch and one more token with every layer captured."""
    layers = tuple(range(engine.model.n_layer))
    spec = CaptureSpec(layers, window=8, probs=not flash_attn)
    native = capture_mod.native.load
    if not use_native:
        capture_mod.native.load = lambda: None
    try:
        sess = Session(engine.model, 512, flash_attn=flash_attn, capture=spec)
    finally:
        capture_mod.native.load = native
    assert sess.capture is not None and sess.capture.native is use_native
    return sess, layers


def test_the_softmax_exp_matches_numpy_s() -> None:
    """The vectorized exp of the host attention's softmax: within 2.5e-7 relative of float64 exp wherever the result
    is a normal float (the scores are sums of shares, so an ulp or two is all it may cost), and never zero or
    negative below that (exp underflows there; these give ~1e-38, nothing next to the row's top share of 1)."""
    rng = np.random.default_rng(2)
    x = np.concatenate([-np.linspace(0, 87, 20001), -rng.exponential(5, 5000), [0.0, -1e-30, -200.0, -np.inf]])
    got = x.astype(np.float32)
    exp_shifted(got, np.float32(0.0))
    want = np.exp(x.astype(np.float32).astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 2.5e-7
    assert (got[~normal] > 0).all() and (got[~normal] < 2e-38).all()
    shifted = np.float32(3.5) + x[:100].astype(np.float32)
    exp_shifted(shifted, np.float32(3.5))
    assert np.allclose(shifted, want[:100], rtol=1e-6)


def test_query_window_keeps_what_concatenating_kept() -> None:
    """The kept query rows (the question's rows for reselection) are the newest ``size`` in position order, and
    rows decoded again replace the old ones: checked against concatenating the whole window every time, over
    decodes, prefill chunks longer than the window and re-reads, including after the buffer slides."""
    rng = np.random.default_rng(3)
    size, shape = 6, (2, 3, 4)
    win = QueryWindow(size, shape)
    ref_q, ref_pos = np.zeros((shape[0], 0, *shape[1:]), np.float32), np.zeros(0, np.int64)
    end = 0
    for _ in range(300):
        r = int(rng.choice([1, 1, 1, 3, 9]))
        back = int(rng.integers(0, 4)) if rng.random() < 0.2 else 0  # a re-read of the newest tokens
        end = max(r, end - back + r) if end else r
        q = rng.standard_normal((shape[0], r, *shape[1:])).astype(np.float32)
        pos = np.arange(end - r, end)
        old = ref_pos < pos[0]
        ref_q = np.concatenate([ref_q[:, old], q], axis=1)[:, -size:]
        ref_pos = np.concatenate([ref_pos[old], pos])[-size:]
        win.keep(q, end)
        for rows in (1, 4, size):
            got_q, got_pos = win.recent(rows)
            assert np.array_equal(got_pos, ref_pos[-rows:]) and np.array_equal(got_q, ref_q[:, -rows:])
    saved = [a.copy() for a in win.recent(size)]
    other = QueryWindow(size, shape)
    other.load(*saved)
    assert all(np.array_equal(a, b) for a, b in zip(other.recent(size), saved, strict=True))


def test_native_capture_copies_what_the_python_twin_copies(tiny) -> None:
    toks = tiny.tokenize(TEXT * 3)[:200]  # one decode batch
    out = []
    for use_native in (True, False):
        sess, layers = _captured(tiny, use_native, toks)
        with sess:
            sess.eval(toks)
            cap = sess.capture
            out.append([(cap.probs(i).copy(), cap.queries(i).copy(), cap.keys(i).copy()) for i in layers])
            n_head, rows, n_kv = out[-1][0][0].shape  # last 8 query rows over the attended cells
            assert (n_head, rows) == (tiny.model.n_head, 8) and n_kv % 256 == 0 and n_kv >= len(toks)
            assert out[-1][0][2].shape == (len(toks), tiny.model.n_head_kv, tiny.model.head_dim)
    for a, b in zip(*out, strict=True):
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)


@pytest.mark.parametrize("which, use_native, flash_attn, type_k", [
    ("tiny", True, True, 1), ("tiny", False, True, 1), ("tiny", True, False, 1),
    pytest.param("real", True, True, 8, marks=pytest.mark.real)])
def test_keys_read_from_the_cache_rows_are_the_bytes_a_peek_copies(which, use_native, flash_attn, type_k, request) -> None:
    """Keys of scattered active positions read straight from llama.cpp's K cache tensors (which the capture finds
    on the first decode, native and Python twin alike) are the bytes the state API copies out for them, every
    layer, with V transposed or not, in an f16 cache and a q8_0 one."""
    engine = request.getfixturevalue(which)
    toks = engine.tokenize(TEXT * 12)[:200]
    assert len(toks) == 200
    spec = CaptureSpec(tuple(range(engine.model.n_layer)), window=8, probs=not flash_attn)
    native = capture_mod.native.load
    if not use_native:
        capture_mod.native.load = lambda: None
    try:
        sess = Session(engine.model, 512, flash_attn=flash_attn, type_k=type_k, type_v=type_k, capture=spec)
    finally:
        capture_mod.native.load = native
    with sess:
        assert sess.capture is not None and sess.capture.native is use_native
        assert sess.capture.cache_tensors() is None  # not known before a decode shows the cache
        sess.eval(toks)
        sess.freeze_positions(np.arange(40, 60))  # scattered cells: runs of several lengths
        pos = np.array([150, 3, 4, 5, 61, 62, 199, 100, 0])
        got_pos, rows, k_type = sess.read_keys(pos)
        parsed = sess.peek(pos)
        assert k_type == parsed.layout.k_type == type_k and len(rows) == engine.model.n_layer
        assert np.array_equal(np.sort(got_pos), np.sort(pos))
        mine, theirs = np.argsort(got_pos), np.argsort(parsed.pos)
        for layer in range(engine.model.n_layer):
            assert np.array_equal(rows[layer][mine], parsed.k[layer][theirs])


def test_keys_come_back_the_same_where_the_device_cannot_gather(tiny, monkeypatch) -> None:
    """Where the cache's device cannot run the gather, keys are read back through the state API (a peek) from
    then on, and a generation is the same to the bit: tokens, logits, scores. The gather itself serves any count
    of cells (its graphs are kept per power of two; more than MAX_CELLS go in parts)."""
    text = "the sky is blue and the grass is green " * 40
    seen, gathers = [], []
    for works in (True, False):
        if not works:
            def refuse(*a, **k):
                raise ValueError("this device cannot")
            monkeypatch.setattr(session_mod, "RowGather", refuse)
        with Runner(tiny.model, AsrKf(min_cache=64), 160, flash_attn=True) as run:
            peeks, peek = [0], run.session.peek

            def counted(positions, peeks=peeks, peek=peek):
                peeks[0] += 1
                return peek(positions)

            run.session.peek = counted
            run.prefill(tiny.tokenize(text)[:400])
            toks, logits = greedy(run, 40)
            seen.append((toks, logits, run.importance.scores[: run.n_logical].copy(), peeks[0]))
            if works:
                sess = run.session
                act = sess.active_positions()
                monkeypatch.setattr(RowGather, "MAX_CELLS", 16)  # more cells than that are gathered in parts
                for n in (1, 2, 3, 8, 9, 33):
                    pos, rows, _ = sess.read_keys(act[:: max(1, len(act) // n)][:n])
                    parsed = sess.peek(pos)
                    by = {int(p): j for j, p in enumerate(parsed.pos)}
                    gathers.append(all(np.array_equal(rows[layer], parsed.k[layer][[by[int(p)] for p in pos]])
                                       for layer in range(tiny.model.n_layer)))
    (t0, l0, s0, p0), (t1, l1, s1, p1) = seen
    assert t0 == t1 and np.array_equal(l0, l1) and np.array_equal(s0, s1)
    assert p0 == 0 < p1 and all(gathers) and len(gathers) == 6


@pytest.mark.parametrize("which", ["tiny", pytest.param("real", marks=pytest.mark.real)])
def test_softmax_capture_agrees_with_host_attention(which, request) -> None:
    """llama.cpp's own probabilities (per cell) and ours from captured Q and mirrored K (per position)."""
    engine = request.getfixturevalue(which)
    toks = engine.tokenize(TEXT * 12)[:300]
    layers = tuple(range(engine.model.n_layer))
    imp = Importance(engine.model, layers, window=8, flash_attn=False, fold_layers=len(layers))
    checks = []

    def on_decode(sess, pos0, n):
        imp.observe(sess.cell_positions, pos0, n)
        cells = sess.cell_positions()
        held = np.flatnonzero(cells >= 0)
        probs = np.mean([imp.capture.probs(i).mean(axis=0) for i in layers], axis=0)[:, held]
        qpos = np.arange(pos0 + n - probs.shape[0], pos0 + n)
        q = np.ascontiguousarray(imp.queries())
        ours = attention_mass(q, qpos, imp.mirror(), cells[held], imp.scale)
        ref = attention_mass_reference(q, qpos, imp.mirror(), cells[held], imp.scale)
        a, b = imp.scores.copy(), imp.scores.copy()
        fold(a, probs, cells[held], qpos, 0.9, 0.1)
        fold_reference(b, probs, cells[held], qpos, 0.9, 0.1)
        logits = sess.ctx.logits()
        checks.append((np.abs(probs - ours).max(), np.abs(ours - ref).max(), np.abs(a - b).max(),
                       abs(entropy(logits) - entropy_reference(logits))))

    with Session(engine.model, 512, capture=imp.spec(), on_decode=on_decode) as sess:
        imp.capture = sess.capture
        sess.eval(toks[:250])
        sess.freeze(40, 120)  # cells and positions no longer line up
        for t in toks[250:]:
            sess.eval([t])
        for i, layer in enumerate(layers):  # the mirror holds exactly the keys the store holds
            pos, raw = zip(*sess.store.keys(layer), strict=True)
            pos, raw = np.concatenate(pos), np.concatenate(raw)
            assert np.array_equal(imp.keys[i, pos].view(np.uint8).reshape(len(pos), -1), raw)
    assert len(checks) == 52
    assert max(c[0] for c in checks) < 1e-4, checks  # f16 K rounding on llama.cpp's side
    assert max(max(c[1:]) for c in checks) < 1e-5  # Numba kernels vs NumPy on the model's own tensors


@pytest.mark.real
def test_flash_attention_scores_rank_like_softmax_scores(real) -> None:
    """With flash attention on there is no softmax to capture; host attention must rank tokens the same."""
    toks = real.tokenize(TEXT * 12)[:400]
    scores = []
    for fa in (False, True):
        imp = Importance(real.model, (3, 9, 15, 21, 27), window=16, flash_attn=fa)
        scores.append(observed_scores(real.model, imp, toks, 360))
    off, on = scores
    assert np.corrcoef(off, on)[0, 1] > 0.99
    assert rank_overlap(off, on) >= 36


@pytest.mark.real
def test_flash_attention_scoring_every_fourth_step_tracks_every_step(real) -> None:
    """Host attention costs O(active keys) a step; folding one decode step in four (with the decay of four)
    must rank tokens like folding all of them, for a quarter of the kernel calls."""
    toks = real.tokenize(TEXT * 12)[:400]
    scores, calls = [], []
    for stride in (1, 4):
        imp = Importance(real.model, (3, 9, 15, 21, 27), window=16, flash_attn=True, stride=stride)
        n = [0]
        mass = imp.mass

        def counted(*a, mass=mass, n=n):
            n[0] += 1
            return mass(*a)

        imp.mass = counted
        scores.append(observed_scores(real.model, imp, toks, 320))
        calls.append(n[0])
    steps = np.arange(320, len(toks))  # prefill chunks (folded either way), then a decode step at each of these
    assert calls[0] - calls[1] == len(steps) - int((steps % 4 == 0).sum())  # all decode steps, or every fourth
    every, fourth = scores
    assert np.corrcoef(every, fourth)[0, 1] > 0.98
    assert rank_overlap(every, fourth) >= 34


def test_split_mode_cuts_every_decode_alike_and_copies_only_when_enabled(tiny10, monkeypatch) -> None:
    """Split mode (layers on a CUDA GPU): every single-token decode is asked for the split layers' queries and nothing
    else, whether it is copied or not (each node asked for ends a graph view; a CUDA backend keeps its graphs
    only while every decode is cut alike); the copies are those a normal capture makes; native = Python twin."""
    toks = tiny10.tokenize(TEXT)[:40]
    asked: list[int] = []
    twin = capture_mod.Capture._python_callback

    def counting(self, tensor, ask, user):
        got = twin(self, tensor, ask, user)
        if ask and got:
            asked[-1] += 1
        return got

    monkeypatch.setattr(capture_mod.Capture, "_python_callback", counting)
    split = (1, 3, 8)
    spec = CaptureSpec(tuple(range(10)), window=8, probs=False, split_layers=split)
    copies = {}
    for use_native in (True, False):
        native = capture_mod.native.load
        if not use_native:
            monkeypatch.setattr(capture_mod.native, "load", lambda: None)
        with Session(tiny10.model, 256, flash_attn=True, capture=spec) as sess:
            monkeypatch.setattr(capture_mod.native, "load", native)
            cap = sess.capture
            assert cap is not None and cap.native is use_native
            sess.eval(toks)  # a prompt batch: every layer's queries and keys
            got = []
            for enabled in (True, False, True):
                asked.append(0)
                cap.split, cap.enabled = True, enabled
                sess.eval([toks[-1]])
                got.append({(kind, layer): cap._get(kind, layer) for kind in (0, 1, 2) for layer in range(10)})
                if not use_native:
                    assert asked[-1] == len(split)  # the same views, copied or not
            for g, enabled in zip(got, (True, False, True), strict=True):
                assert {k for k, v in g.items() if v is not None} == ({(1, layer) for layer in split} if enabled else set())
            copies[use_native] = [got[0][(1, layer)].copy() for layer in split]
            cap.split, cap.enabled = False, True  # a normal capture of the same decode: the same queries
            sess.rewind(1)
            sess.eval([toks[-1]])
            for layer, q in zip(split, copies[use_native], strict=True):
                np.testing.assert_array_equal(cap.queries(layer), q)
    for a, b in zip(copies[True], copies[False], strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_mode_generates_what_a_normal_capture_does(tiny10) -> None:
    """With the split on, an observed decode has the scored layers' queries only (NaN elsewhere in the kept
    window) and its keys are read back from the cache: the generation is the same to the bit."""
    text = "the sky is blue and the grass is green " * 40
    seen = []
    for split in (False, True):
        with Runner(tiny10.model, AsrKf(min_cache=64), 160, flash_attn=True) as run:
            imp = run.importance
            imp.split = split
            run.prefill(tiny10.tokenize(text)[:400])
            toks, logits = greedy(run, 40)
            q, _ = imp.recent_queries(32)
            whole, qpos = imp.recent_queries(32, complete=True)
            assert np.isnan(q).any() == split and not np.isnan(whole).any()
            partial = int(np.isnan(q[:, :, 0, 0]).any(axis=0).sum())  # the observed decodes' rows
            assert len(qpos) == 32 - partial and (qpos[-1] == 399) == split  # then the prompt's own rows
            seen.append((toks, logits, imp.scores[: run.n_logical].copy(), run.frozen()))
    (t0, l0, s0, f0), (t1, l1, s1, f1) = seen
    assert t0 == t1 and np.array_equal(l0, l1) and np.array_equal(s0, s1) and np.array_equal(f0, f1)


def test_the_float16_path_is_chosen_without_llvm_s_host_query_on_linux(monkeypatch) -> None:
    """llvmlite's host-feature query aborted the process on a GPU host once llama.cpp's CUDA build was loaded and
    Numba had compiled, so importing asrkf_edge failed there: on Linux the choice reads /proc/cpuinfo instead, and
    Numba's own feature settings override it. Importing after llama.cpp and a compile must work."""
    import platform
    import subprocess
    import sys

    def abort() -> None:
        raise AssertionError("llvmlite's host query was called")

    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.setattr(importance.llvm, "get_host_cpu_features", abort)
    if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        assert importance._hardware_f16() == ("f16c" in flags)
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,-f16c")
    assert not importance._hardware_f16()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+f16c")
    assert importance._hardware_f16()
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert not importance._hardware_f16()
    code = "import llama_cpp, numba; numba.njit(lambda: 0)(); import asrkf_edge.importance; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_with_layers_on_a_gpu_asrkf_scores_four_layers_and_cuts_each_decode_at_them(tmp_path) -> None:
    """asrkf captures every layer; its scores fold 8 of them on the CPU and 4 with the layers on a GPU, where each
    decode is cut at those layers' queries: on the LLaMA-3-8B shape an H100 decoded at 0.86-0.95x of full instead
    of 0.81-0.89x at 4k-32k, for the same mean KLD (AsrKf's docstring). A fold of no layer is an error."""
    path = write_tiny_llama(tmp_path / "tiny10.gguf", n_layer=10)
    for gpu_layers, scored in ((0, (0, 1, 3, 4, 5, 6, 8, 9)), (1, (0, 3, 6, 9))):
        with Engine.load(path, n_gpu_layers=gpu_layers) as eng, eng.runner(AsrKf(), 256) as run:
            spec = run.importance.spec()
            assert spec.layers == tuple(range(10)) and spec.prob_layers == scored
        with Engine.load(path, n_gpu_layers=gpu_layers) as eng, eng.runner(make_policy("h2o"), 256) as run:
            assert len(run.importance.spec().prob_layers) == 8
    with Engine.load(path) as eng, pytest.raises(ValueError, match="fold_layers"):
        eng.runner(AsrKf(fold_layers=0), 256)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are faulted in ahead on Linux only")
def test_with_layers_on_a_gpu_the_key_mirror_is_faulted_in_before_the_prompt_writes_it(tiny_path, monkeypatch) -> None:
    """Where the layers are on a GPU the mirror's room for a prompt is faulted in on a background thread, not by the
    key writes of each chunk (a 4k read as on a GPU with the LLaMA-3-8B shape's KV, 2-core EPYC: those writes 0.72 ->
    0.09 s), and it still reads as zeros; on the CPU it is not asked for (the thread would take a core from the
    decode)."""
    asked: list[tuple[int, int]] = []
    fault_in = pages.fault_in

    def spy(owner, ranges):  # noqa: ANN001, ANN202
        asked.extend((owner.ctypes.data + a, owner.ctypes.data + b) for a, b in ranges)
        return fault_in(owner, ranges)

    monkeypatch.setattr(pages, "fault_in", spy)
    for gpu_layers in (1, 0):
        asked.clear()
        with Engine.load(tiny_path, n_gpu_layers=gpu_layers) as eng:
            imp = Importance(eng.model, tuple(range(eng.model.n_layer)), window=8, flash_attn=True)
            old = imp.keys.shape[1]
            imp.reserve((64 << 20) // (len(imp.layers) * imp.keys.shape[2] * imp.keys.itemsize))  # a mapping of its own
            pages.prefaulter().submit(int).result()  # the faults asked for so far are done
            if not gpu_layers:
                assert not asked
                continue
            if not pages.populate_ok:
                pytest.skip("this kernel cannot fault pages in ahead (MADV_POPULATE_WRITE)")
            for layer in range(len(imp.layers)):  # every layer's room past what the growth copied, in order
                start, end = imp.keys[layer, old:].ctypes.data, imp.keys[layer, old:].ctypes.data + imp.keys[layer, old:].nbytes
                covered = sorted((a, b) for a, b in asked if start <= a < end)
                assert covered[0][0] == start and covered[-1][1] == end
                assert all(b == c for (_, b), (c, _) in zip(covered, covered[1:], strict=False))
            assert mapped(imp.keys).all() and not imp.keys.any()


def test_in_the_background_keys_are_read_from_the_cache_and_generate_what_graph_copies_do(tiny10, monkeypatch) -> None:
    """With the layers on a GPU the tracker copies no keys out of the graph: it reads them back from the cache,
    float16 as the mirror holds them (an H100's host spent 0.82 s of a 16k prompt's read rounding the copied ones).
    The mirror, the scores and the generation are those of the graph's copies, to the bit."""
    text = "the sky is blue and the grass is green " * 40
    make = importance.Importance.__init__

    def as_on_a_gpu(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        make(self, *a, **k)
        self.background = True  # the kernels stay serial: no GPU's cores are idle here

    monkeypatch.setattr(importance.Importance, "__init__", as_on_a_gpu)
    spec = importance.Importance.spec
    seen = []
    for copied in (True, False):
        if copied:
            monkeypatch.setattr(importance.Importance, "spec", lambda self: dataclasses.replace(spec(self), keys=True))
        else:
            monkeypatch.setattr(importance.Importance, "spec", spec)
        with Runner(tiny10.model, AsrKf(min_cache=64), 160, flash_attn=True) as run:
            imp = run.importance
            assert run.session.capture.spec.keys == copied
            run.prefill(tiny10.tokenize(text)[:400])
            toks, logits = greedy(run, 40)
            known = np.flatnonzero(imp.known)
            assert len(known) >= 160
            seen.append((toks, logits, imp.scores[: run.n_logical].copy(), run.frozen(), known, imp.keys[:, known].copy()))
    (t0, l0, s0, f0, k0, m0), (t1, l1, s1, f1, k1, m1) = seen
    assert t0 == t1 and np.array_equal(l0, l1) and np.array_equal(s0, s1) and np.array_equal(f0, f1)
    both = np.intersect1d(k0, k1)
    assert len(both) >= 160 and np.array_equal(m0[:, np.isin(k0, both)], m1[:, np.isin(k1, both)])


def test_a_decode_beside_the_policys_hooks_generates_what_one_after_the_other_does(tiny10, monkeypatch) -> None:
    """With the layers on a GPU a token's decode runs on llama.cpp's side while the policy's hooks run here (every
    llama.cpp call they make waits for it): the tokens, logits, scores, frozen set and copies are those of the decode
    and the hooks one after the other, to the bit. Here most decodes are launched beside the hooks."""
    text = "the sky is blue and the grass is green " * 40
    make = importance.Importance.__init__

    def as_on_a_gpu(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        make(self, *a, **k)
        self.background = True
        self.split = True  # every decode cut alike, one in ``stride`` copied (CUDA's graphs)

    monkeypatch.setattr(importance.Importance, "__init__", as_on_a_gpu)
    monkeypatch.setattr(llama_mod.Model, "offloaded", property(lambda self: True))  # no recall, the decode thread
    monkeypatch.setattr(runner_mod, "cuda_graphs", lambda: True)  # where it is on
    beside_hooks = session_mod.Session._decode_beside
    launched: list[int] = []

    def counted(self, chunk, pos0) -> None:  # noqa: ANN001
        launched.append(pos0)
        beside_hooks(self, chunk, pos0)

    monkeypatch.setattr(session_mod.Session, "_decode_beside", counted)
    gathers = {"beside": 0, "after": 0, "queued": 0}  # gathers of the cache's rows while a decode is in flight, and not
    contexts: list[llama_mod.Context] = []
    gather_rows = RowGather.gather

    def watched(self, cells, count=None):  # noqa: ANN001
        gathers["beside" if contexts[-1]._inflight else "after"] += 1
        return gather_rows(self, cells, count)

    monkeypatch.setattr(RowGather, "gather", watched)
    later = llama_mod.Context._later

    def queued(self, call) -> None:  # noqa: ANN001
        gathers["queued"] += self._inflight  # a thaw's or freeze's removal made beside the decode, run after it
        later(self, call)

    monkeypatch.setattr(llama_mod.Context, "_later", queued)
    seen = []
    for beside in (False, True):
        launched.clear()
        gathers.update(beside=0, after=0, queued=0)
        with Runner(tiny10.model, AsrKf(min_cache=64), 160, flash_attn=True) as run:
            assert run.session.overlap and run.session.ctx.threaded and run.session.recall is None
            contexts.append(run.session.ctx)
            run.session.overlap = beside
            run.prefill(tiny10.tokenize(text)[:400])
            toks, logits = greedy(run, 48)
            st = run.stats()
            seen.append((toks, logits, run.importance.scores[: run.n_logical].copy(), run.frozen(),
                         (st.freeze_events, st.thaw_events, st.frozen_tokens, st.recoveries)))
        assert (len(launched) >= 40) == beside  # the observed decodes (one in 8) are captured: not beside
        assert (gathers["beside"] > 0) == beside and gathers["after"] > 0  # rows of earlier tokens read beside it
        assert (gathers["queued"] > 0) == beside
    (t0, l0, s0, f0, c0), (t1, l1, s1, f1, c1) = seen
    assert t0 == t1 and np.array_equal(l0, l1) and np.array_equal(s0, s1) and np.array_equal(f0, f1)
    assert c0 == c1 and c0[0] > 0 and c0[1] > 0  # freezes and thaws happened, the same


def test_rows_of_earlier_tokens_are_read_beside_a_decode_unless_it_re_rotates_them(tiny) -> None:
    """With a capture callback a decode returns only when the device is done, so a gather of the rows of earlier
    positions need not wait for the decode in flight (its own positions must); after a renumbering the next decode
    first re-rotates every cell's K, and then the gather waits."""
    asked = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(lambda t, ask, user: False)
    ctx = llama_mod.Context(tiny.model, llama_mod.ContextConfig(64), asked, None, threaded=True)
    try:
        ctx.decode([1, 2, 3], 0)
        ctx.launch([4], 3)
        ctx.wait_rows(3)
        assert ctx._inflight  # rows of positions 0-2 read beside it
        ctx.wait_rows(4)
        assert not ctx._inflight  # its own position: waited for
        ctx.seq_add(0, 3, 4, 0)
        ctx.launch([5], 4)
        ctx.wait_rows(3)
        assert not ctx._inflight
    finally:
        ctx.close()


def test_a_launched_decode_is_waited_for_by_the_next_call_and_its_error_raised_there(tiny) -> None:
    """:meth:`Context.launch` returns at once; a call on the context waits for the decode, and a decode llama.cpp
    refuses (a position that skips ahead) raises at the wait, naming the position, and leaves the context usable;
    a removal made while it was in flight is made after it, failed or not."""
    ctx = llama_mod.Context(tiny.model, llama_mod.ContextConfig(64), threaded=True)
    assert ctx.threaded  # the native library is built (pip install -e .)
    try:
        ctx.decode([1, 2], 0)
        ctx.launch([3], 2)
        assert ctx.seq_pos_max(0) == 2  # waited for
        ctx.launch([4], 9)
        ctx.seq_rm(0, 2, 3)  # made beside the decode: runs once it is done, failed or not
        with pytest.raises(LlamaError, match="position 9"):
            ctx.wait()
        assert ctx.failed_at == 9 and ctx.seq_pos_max(0) == 1
        ctx.launch([4], 2)
        assert ctx.logits().shape == (tiny.model.n_vocab,) and ctx.seq_pos_max(0) == 2
    finally:
        ctx.close()
