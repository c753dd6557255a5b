"""Recall inside the graph: frozen rows lent to each layer for one decode, every cell's own rows back after it."""

from __future__ import annotations

import numpy as np
import pytest

from asrkf_edge import Engine
from asrkf_edge import blob as blobfmt
from asrkf_edge import capture as capture_mod
from asrkf_edge import recall as recall_mod
from asrkf_edge.bench.suites import _text_tokens, forced_decode
from asrkf_edge.errors import LlamaError
from asrkf_edge.kvcopy import blob_side, k_view, v_view
from asrkf_edge.policies import make_policy


def _rows_by_position(run) -> dict[int, tuple[bytes, bytes]]:
    """Every active token's K and V bytes of every layer, from llama.cpp's own state of sequence 0."""
    raw = run.session.ctx.state_get(0).copy()
    parsed = blobfmt.parse(raw)
    side = blob_side(raw, parsed.layout, len(parsed.pos))
    out = {}
    for i, p in enumerate(parsed.pos.tolist()):
        k = b"".join(k_view(side, parsed.layout, layer)[i].tobytes() for layer in range(parsed.layout.n_layer))
        v = b"".join(v_view(side, parsed.layout, layer)[i].tobytes() for layer in range(parsed.layout.n_layer))
        out[p] = (k, v)
    return out


def _reading(engine: Engine, n: int = 800):
    """A runner of asrkf-recall that has read ``n`` tokens of prose into 256 cells (most of it frozen)."""
    run = engine.runner(make_policy("asrkf-recall"), 256)
    run.prefill(_text_tokens(engine, n))
    assert run.session.n_frozen > 400
    return run


@pytest.mark.real
@pytest.mark.parametrize("flash", [False, True])
def test_recall_lends_frozen_rows_inside_a_decode_and_gives_every_cell_its_own_back(real_path, flash: bool) -> None:
    """With V transposed (flash attention off) and as rows: a decode recalls frozen tokens into some layers, and
    afterwards every token that was active holds exactly the K and V bytes it held before."""
    with Engine.load(real_path, flash_attn=flash) as eng, _reading(eng) as run:
        before = _rows_by_position(run)
        rows = run.session.recall.rows
        run.decode(int(np.argmax(run.logits())))
        assert run.session.recall.rows > rows  # some layer's query wanted a frozen token more than an active one
        after = _rows_by_position(run)
        kept = set(before) & set(after)
        assert len(kept) > 200
        assert all(before[p] == after[p] for p in kept)


@pytest.mark.real
def test_a_decode_after_freezes_and_thaws_lends_from_the_new_frozen_set(real) -> None:
    """Recall keeps the frozen side's registers (positions, store slots) from decode to decode; once tokens are
    frozen and thawed between two decodes (the thawed ones' slots taken by the newly frozen), the next decode lends
    from the store as it now is: the same logits as with those registers built afresh."""
    def changed(cold: bool) -> np.ndarray:
        with _reading(real) as run:
            run.decode(int(np.argmax(run.logits())))  # the frozen side kept after this decode
            s = run.session
            back = s.frozen_positions()[100:140]
            act = s.active_positions()
            assert s.freeze_positions(act[~s.protected(act)][:40]) == 40
            assert s.thaw_positions(back) == 40
            if cold:
                s.recall._frozen_of = (None, -1)
            run.decode(int(np.argmax(run.logits())))
            return run.logits().copy()

    assert np.array_equal(changed(cold=False), changed(cold=True))


@pytest.mark.real
def test_a_failure_inside_the_graph_is_raised_after_the_decode_with_every_row_back(real, monkeypatch) -> None:
    """A layer whose queries are not what recall reads (here the tenth, told to expect another head count) cannot
    leave a cell holding another token's rows: the layers after it lend nothing, the decode ends, every lent row is
    put back, then the error reaches the caller."""
    with _reading(real) as run:
        before = _rows_by_position(run)
        arm = recall_mod.Recall.arm

        def arm_wrong(self, pos0, n, left=0):
            arm(self, pos0, n, left)
            self._layers[10, recall_mod.HEADS_OF] += 1

        monkeypatch.setattr(recall_mod.Recall, "arm", arm_wrong)
        rows = run.session.recall.rows
        with pytest.raises(LlamaError, match="layer 10"):
            run.decode(int(np.argmax(run.logits())))
        assert run.session.recall.rows > rows  # the layers before it lent rows
        after = _rows_by_position(run)
        assert all(before[p] == after[p] for p in set(before) & set(after))


@pytest.mark.real
def test_recall_predicts_the_next_tokens_closer_to_full(real) -> None:
    """Acceptance (issue 14's KLD): 32 tokens of prose read after 1,000 at budget 0.35; asrkf with recall gives
    next-token distributions closer to the full cache's than asrkf without it in its decodes, at the same active cells."""
    tokens = _text_tokens(real, 1032)
    ctx, tail = tokens[:1000], tokens[1000:]
    ref = forced_decode(real, make_policy("full"), None, ctx, tail)
    plain = forced_decode(real, make_policy("asrkf"), 0.35, ctx, tail)
    lent = forced_decode(real, make_policy("asrkf-recall"), 0.35, ctx, tail)
    assert lent.stats.active_tokens_peak == plain.stats.active_tokens_peak
    assert lent.kld(ref) < 0.6 * plain.kld(ref), (lent.kld(ref), plain.kld(ref))


@pytest.mark.real
def test_the_python_capture_lends_the_same_rows_as_the_native_one(real, monkeypatch) -> None:
    """The capture's Python twin calls recall at the same nodes: the same logits, token for token."""
    tokens = _text_tokens(real, 700)
    ctx, tail = tokens[:690], tokens[690:]
    native = forced_decode(real, make_policy("asrkf-recall"), 0.35, ctx, tail)
    monkeypatch.setattr(capture_mod.native, "load", lambda: None)
    calls = []
    twin = capture_mod.Capture._recall_layer

    def counted(self, head, kind, layer):
        calls.append(1)
        return twin(self, head, kind, layer)

    monkeypatch.setattr(capture_mod.Capture, "_recall_layer", counted)
    python = forced_decode(real, make_policy("asrkf-recall"), 0.35, ctx, tail)
    assert calls  # the twin ran
    assert all(np.array_equal(a, b) for a, b in zip(native.logprobs, python.logprobs, strict=True))


@pytest.mark.real
def test_the_question_is_read_again_decode_by_decode_with_recall(real, monkeypatch) -> None:
    """After a prompt, the tokens read again with what the question brought back (the question itself) go in
    decodes short enough for recall, each of its queries lending rows of its own; not in one chunk that no layer's
    recall sees."""
    decodes = []
    arm = recall_mod.Recall.arm

    def counted(self, pos0, n, left=0):
        before = self.rows
        arm(self, pos0, n, left)
        decodes.append((n, bool(self._regs[recall_mod.ARMED]), before))

    monkeypatch.setattr(recall_mod.Recall, "arm", counted)
    prompt = _text_tokens(real, 800) + real.tokenize(" Question: what colour is the grass? Answer:", add_bos=False)
    with real.runner(make_policy("asrkf-recall"), 256) as run:
        run.prefill(prompt)
        short = [(n, armed) for n, armed, _ in decodes if n <= run.session.recall.max_rows]
        assert len(short) >= 4 and all(armed for _, armed in short)  # the 32 re-read tokens, recall on in each
        assert run.session.recall.rows > decodes[-len(short)][2]  # and they lent rows


@pytest.mark.real
def test_a_prompt_chunk_lends_rows_chosen_by_some_of_its_queries(real) -> None:
    """With ``recall_prompt_rows`` a prompt's long chunks recall frozen rows too, chosen by that many of their query
    rows; without it they lend none. (Read with ``final=False``: no question re-read, whose short decodes recall.)"""
    tokens = _text_tokens(real, 800)
    lent = {}
    for rows in (0, 32):
        with real.runner(make_policy("asrkf-recall", recall_prompt_rows=rows), 256) as run:
            run.prefill(tokens, final=False)
            assert run.session.n_frozen > 400
            lent[rows] = run.session.recall.rows
    assert lent[0] == 0 and lent[32] > 0, lent


@pytest.mark.real
def test_only_the_newest_tokens_of_a_prompt_recall_in_its_chunks(real, monkeypatch) -> None:
    """``recall_prompt_tail``: a prompt's chunks lend rows only where they start within its newest tokens, counted
    to the prompt's end across ``prefill`` calls (``rest``); every chunk is armed with how much of the prompt follows."""
    calls = []
    arm = recall_mod.Recall.arm

    def seen(self, pos0, n, left=0):
        arm(self, pos0, n, left)
        calls.append((pos0, n, left, bool(self._regs[recall_mod.ARMED])))

    monkeypatch.setattr(recall_mod.Recall, "arm", seen)
    tokens = _text_tokens(real, 1024)
    pol = make_policy("asrkf-recall", recall_prompt_tail=300)
    with real.runner(pol, 256) as run:
        run.prefill(tokens[:512], final=False, rest=512)
        run.prefill(tokens[512:], final=False)
    chunks = [(pos0, n, left, armed) for pos0, n, left, armed in calls if n > run.session.recall.max_rows]
    assert [pos0 + n + left for pos0, n, left, _ in chunks] == [1024] * len(chunks)  # the prompt's end, every time
    assert all(armed == (n + left <= 300) for _, n, left, armed in chunks[1:])  # the first: nothing frozen yet
    assert sum(armed for *_, armed in chunks) >= 2


@pytest.mark.real
def test_recall_in_the_prompt_s_newest_chunks_and_the_reply_s_first_tokens_brings_them_closer_to_full(real) -> None:
    """Acceptance (issue 14): 1,500 tokens of prose read at budget 0.35, then 32 forced tokens: reading the prompt's
    newest chunks with recall gives next-token distributions closer to full's than reading them without it, for
    asrkf-recall (which recalls in its decodes too) and for asrkf (0.034 against 0.039 here, 2-core Xeon); asrkf's
    recall in a reply's first decodes (``recall_reply``, off by default) brings them closer again. The same cells
    each way."""
    tokens = _text_tokens(real, 1532)
    ctx, tail = tokens[:1500], tokens[1500:]
    ref = forced_decode(real, make_policy("full"), None, ctx, tail)
    cases = (("asrkf-recall", {"recall_prompt_rows": 0}, {}, 0.8),
             ("asrkf", {"recall_prompt_rows": 0}, {}, 0.95),
             ("asrkf", {}, {"recall_reply": 32}, 0.9))
    for policy, without, with_, ratio in cases:
        off = forced_decode(real, make_policy(policy, **without), 0.35, ctx, tail)
        on = forced_decode(real, make_policy(policy, **with_), 0.35, ctx, tail)
        assert on.stats.active_tokens_peak == off.stats.active_tokens_peak
        assert on.kld(ref) < ratio * off.kld(ref), (policy, without, on.kld(ref), off.kld(ref))
        assert off.stats.recalled_rows < on.stats.recalled_rows


@pytest.mark.real
def test_asrkf_recalls_in_a_prompt_s_chunks_and_a_reply_s_first_decodes_only(real) -> None:
    """asrkf (the default) reads a prompt's newest chunks with recall and lends nothing in its decodes (on prose it
    was never tuned on, lending in a reply's first 32 lost 7 answers of 40); with ``recall_reply`` it lends rows in
    that many decodes after the prompt (``recall`` 0: none in later ones); a recall of no rows anywhere is refused."""
    first = 32
    tokens = _text_tokens(real, 800 + first + 16)
    for overrides in ({}, {"recall_reply": first}):  # the default, then the reply's recall asked for
        reply = overrides.get("recall_reply", 0)
        with real.runner(make_policy("asrkf", **overrides), 256) as run:
            run.prefill(tokens[:800])
            assert run.session.n_frozen > 400
            lent = run.session.recall.rows
            assert lent > 0
            for tok in tokens[800 : 800 + first]:
                run.decode(tok)
            in_reply = run.session.recall.rows
            assert in_reply > lent if reply else in_reply == lent
            for tok in tokens[800 + first :]:
                run.decode(tok)
            assert run.session.recall.rows == in_reply and run.session.kv_stats().recalled_rows == in_reply
    with pytest.raises(ValueError, match="recall size"):
        recall_mod.Recall(run.session, run.importance, 0)
    with pytest.raises(ValueError, match="recall size"):
        recall_mod.Recall(run.session, run.importance, 0, reply=32)


def test_asrkf_recall_runs_as_asrkf_with_layers_on_a_gpu(tiny_path) -> None:
    """Where recall cannot lend rows (layers on a GPU) asrkf-recall is asrkf, recovery trigger included: not asrkf
    without its trigger."""
    with Engine.load(tiny_path, n_gpu_layers=1) as eng, eng.runner(make_policy("asrkf-recall"), 64) as run:
        assert run.session.recall is None
        assert run.policy.name == "asrkf-recall" and run.policy.trigger == make_policy("asrkf").trigger != "none"
    with Engine.load(tiny_path) as eng, eng.runner(make_policy("asrkf-recall"), 64) as run:
        assert run.session.recall is not None and run.policy.trigger == "none"
    for layers in (1, 0):  # asrkf reads a prompt's chunks with recall on the CPU only
        with Engine.load(tiny_path, n_gpu_layers=layers) as eng, eng.runner(make_policy("asrkf"), 64) as run:
            assert (run.session.recall is None) == (layers == 1)
