"""KV policies in generation: schedule, entropy rule, budgets, passkey retrieval and recoveries."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from scoring import greedy

from asrkf_edge import Engine
from asrkf_edge.bench.tasks import needle, needle_multiturn, passkey
from asrkf_edge.generate import generate_step
from asrkf_edge.llama import Sampler
from asrkf_edge.policies import AsrKf, Full, Streaming, make_policy, policy_names
from asrkf_edge.policies.recovery import EntropyMonitor, EntropyRule
from asrkf_edge.policies.schedule import Ledger, Schedule
from asrkf_edge.runner import Runner, budget_cells

GPL = (Path(__file__).parent / "data" / "gpl-3.0.txt").read_text()
GFDL = (Path(__file__).parent / "data" / "gfdl-1.3.txt").read_text()  # never tuned on


def test_freeze_duration_grows_like_sqrt_of_detections() -> None:
    s = Schedule(base=16, law="sqrt")
    assert s.duration(np.array([1, 4, 9, 16])).tolist() == [16, 32, 48, 64]
    assert Schedule(base=16, law="linear").duration(np.array([4])).tolist() == [64]
    with pytest.raises(ValueError, match="growth law"):
        Schedule(law="cubic")  # type: ignore[arg-type]
    ledger = Ledger(s)
    ledger.grow(10)
    ledger.frozen(np.array([3]), step=100)
    ledger.thawed(np.array([3]), step=116)
    ledger.frozen(np.array([3, 5]), step=200)  # second detection of 3 lasts sqrt(2) times longer
    assert ledger.until[[3, 5]].tolist() == [200 + 23, 200 + 16]
    assert ledger.due(np.array([3, 5]), 216).tolist() == [False, True]
    assert ledger.due(np.array([3, 5]), 223).tolist() == [True, True]


def test_entropy_spike_rule() -> None:
    mon = EntropyMonitor(EntropyRule(k=3.0, floor=1.0, warmup=8))
    rng = np.random.default_rng(0)
    assert not any(mon.observe(h) for h in 2.0 + 0.1 * rng.standard_normal(8))  # warm-up never spikes
    assert not mon.observe(2.2)
    assert mon.observe(4.0)
    assert not mon.observe(0.9)  # below the floor: never a spike
    absolute = EntropyMonitor(EntropyRule(absolute=3.0, warmup=100))
    assert absolute.observe(3.5) and not absolute.observe(2.5)
    # an entropy that barely moves (random weights: +-0.0003 nats): k standard deviations are noise, not a spike
    flat = 10.689 + 0.0003 * rng.standard_normal(64)
    for rise, spikes in ((0.0, True), (0.25, False)):
        mon = EntropyMonitor(EntropyRule(rise=rise))
        assert any([mon.observe(h) for h in flat]) == spikes
    assert mon.observe(10.689 + 0.3)  # a rise of a quarter nat still is
    # the benchmarks' JSON variants change a field of the rule by name, the rest kept
    assert make_policy("asrkf", entropy={"rise": 0.0}).entropy == EntropyRule(rise=0.0)


def test_budget_is_a_fraction_of_the_prompt_or_a_token_count() -> None:
    asrkf = AsrKf()
    assert budget_cells(asrkf, 0.4, 2000, 10) == 800
    assert budget_cells(asrkf, 900, 2000, 10) == 900
    assert budget_cells(asrkf, 0.01, 2000, 10) == asrkf.min_cells()
    assert budget_cells(asrkf, None, 2000, 10) == 800  # the policy's own budget, 0.4
    assert budget_cells(asrkf, None, 300, 10) == 310  # ... never below min_cache (512), never above the context
    assert budget_cells(AsrKf(budget=None), None, 2000, 10) == 2010  # no cap: threshold freezing only
    assert budget_cells(Full(), 0.4, 2000, 10) == 2010
    with pytest.raises(ValueError, match="needs a budget"):
        budget_cells(Streaming(), None, 2000, 10)
    with pytest.raises(ValueError, match="positive"):
        budget_cells(asrkf, -1, 2000, 10)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ValueError, match="threshold"):
        AsrKf(threshold=0)
    with pytest.raises(ValueError, match="reeval_lag"):
        AsrKf(reeval_lag=64)  # it would land after the next re-evaluation is taken


def test_streaming_drops_and_asrkf_keeps_everything(tiny) -> None:
    prompt = "the sky is blue and the grass is green " * 15
    kept = tiny.generate(prompt, 20, policy="asrkf", budget=100, chat=False).stats.kv
    dropped = tiny.generate(prompt, 20, policy="streaming", budget=100, chat=False).stats.kv
    for st in (kept, dropped):
        assert st.active_tokens_peak <= 100
    assert kept.dropped_tokens == 0
    assert kept.active_tokens + kept.frozen_tokens == kept.logical_tokens  # nothing lost
    assert dropped.frozen_tokens == 0
    assert dropped.active_tokens + dropped.dropped_tokens == dropped.logical_tokens


def shares_job(active: np.ndarray, frozen: np.ndarray) -> Future:
    """A finished re-evaluation job whose attention gives these uniform shares to the active and frozen tokens."""
    shares = np.concatenate([active, frozen])
    done: Future = Future()
    done.set_result((shares / len(shares))[None, :])
    return done


def test_expired_tokens_are_judged_where_they_lie(tiny, monkeypatch) -> None:
    """Rolling re-evaluation: an expired frozen token the newest queries attend to (at the freeze bar, above
    the active tokens it would replace) comes back; one they ignore stays in the store, frozen again for
    longer, and no data moves for it."""
    text = "the sky is blue and the grass is green " * 40
    with tiny.runner(AsrKf(min_cache=64), 160) as run:
        run.prefill(tiny.tokenize(text)[:400])
        pol, sess = run.policy, run.session
        sess.freeze_positions(sess.active_positions()[40:80])  # free cells for what may come back
        frozen = sess.store.positions()
        wanted, ignored = frozen[:6], frozen[6:12]
        ledger = pol._ledger
        ledger.until[frozen] = run.step + 1000
        ledger.until[np.concatenate([wanted, ignored])] = run.step  # their freeze runs out now
        counts = ledger.count[ignored].copy()
        rel = lambda runner, a, f: shares_job(np.zeros(len(a)), np.where(np.isin(f, wanted), 2 * pol.threshold, 0.0))  # noqa: E731
        monkeypatch.setattr(pol, "_relevance_job", rel)
        thaws = sess.thaw_events
        pol.after_decode(run, sess.n_logical - 2, 2)
        assert not sess.store.is_frozen(wanted).any()
        assert sess.store.is_frozen(ignored).all()
        assert (ledger.count[ignored] == counts + 1).all() and (ledger.until[ignored] > run.step).all()
        assert sess.thaw_events == thaws + 1
        assert sess.kv_stats().active_tokens + sess.kv_stats().frozen_tokens == 400  # nothing lost


def test_a_full_cache_frees_whole_groups_of_cells(tiny) -> None:
    """``evict_cells``: a candidate leaves with every candidate of its group of neighbouring cells, so the cells
    a full cache frees (where later thaws land, one upload per run of cells, layer and K/V on a GPU) form runs;
    token by token they are scattered."""
    text = "the sky is blue and the grass is green " * 40
    freed: dict[int, tuple[int, int]] = {}
    for g in (1, 8):
        with tiny.runner(AsrKf(min_cache=64, evict_cells=g), 160) as run:
            sess, evict, seen = run.session, run.session.evict, []

            def record(s, need, batch, cand, evict=evict, seen=seen, g=g):
                chosen = evict(s, need, batch, cand)
                group = s.cells_of(cand) // g
                out = np.isin(cand, chosen)
                assert np.array_equal(out, np.isin(group, group[out]))  # whole groups leave
                cells = np.sort(s.cells_of(chosen))
                seen.append((len(cells), 1 + int(np.count_nonzero(np.diff(cells) != 1))))
                return chosen

            sess.evict = record
            run.prefill(tiny.tokenize(text)[:400])
            assert sess.kv_stats().active_tokens + sess.kv_stats().frozen_tokens == 400  # nothing lost
        freed[g] = tuple(np.sum(seen, axis=0))
    (n1, runs1), (n8, runs8) = freed[1], freed[8]
    assert n1 > 0 and n8 > 0
    assert runs8 / n8 < 0.5 * runs1 / n1, freed


def test_the_background_fold_gives_the_inline_fold_s_scores_and_tokens(tiny) -> None:
    """On a GPU the host attention of an observation runs on a worker thread while the next tokens decode;
    everything that reads scores waits for it, so a generation is the same to the bit: the tokens, the logits,
    the scores, what is frozen (re-evaluations, which land later in the background, are left out here)."""
    text = "the sky is blue and the grass is green " * 40
    seen = []
    for background in (False, True):
        with Runner(tiny.model, AsrKf(min_cache=64, reeval_every=10_000), 160, flash_attn=True) as run:
            imp, folds = run.importance, [0]
            imp.background = background
            inline = imp._fold_from_mirror

            def counted(*a, inline=inline, folds=folds):
                folds[0] += 1
                return inline(*a)

            imp._fold_from_mirror = counted
            run.prefill(tiny.tokenize(text)[:400])
            toks, logits = greedy(run, 60)
            seen.append((toks, logits, imp.scores[: run.n_logical].copy(), run.frozen(), folds[0]))
    (t0, l0, s0, f0, n0), (t1, l1, s1, f1, n1) = seen
    assert n0 == 0 and n1 >= 10  # the worker folded every observation
    assert t0 == t1 and np.array_equal(l0, l1) and np.array_equal(s0, s1) and np.array_equal(f0, f1)
    assert len(f1) > 0


def test_a_decode_of_new_positions_does_not_wait_for_the_background_work(tiny) -> None:
    """Observing a new token leaves the queued work running (the fold has the decodes until the next reader
    to finish, not one); reading a token again, whose keys or scores a job may use, waits for it, as does any
    reader of the scores."""
    text = "the sky is blue and the grass is green " * 40
    with Runner(tiny.model, AsrKf(min_cache=64), 160, flash_attn=True) as run:
        imp, sess = run.importance, run.session
        imp.background = True
        run.prefill(tiny.tokenize(text)[:400])
        go = threading.Event()
        held = lambda q, qpos, kpos: go.wait(10)  # noqa: E731
        kpos = sess.active_positions()
        job = imp._queue(held, True, np.zeros(1), np.array([run.n_logical - 1]), kpos)
        sess.capture.enabled = False  # as on a decode step that is not observed
        imp.observe(sess.cell_positions, run.n_logical, 1)
        assert not job.done()
        threading.Timer(0.2, go.set).start()
        imp.observe(sess.cell_positions, run.n_logical - 1, 1, fold_scores=False)  # read again: waits
        assert job.done() and job.result()
        job = imp._queue(held, True, np.zeros(1), np.array([run.n_logical - 1]), kpos)
        go.clear()
        threading.Timer(0.2, go.set).start()
        imp.of(kpos)
        assert job.done() and job.result()
        go.clear()  # a job that writes no scores (a policy's mass job): readers of the scores go on
        job = imp._queue(held, False, np.zeros(1), np.array([run.n_logical - 1]), kpos)
        imp.of(kpos)
        assert not job.done()
        go.set()
        assert job.result()


def test_background_work_is_handed_to_the_worker_at_the_next_decode(tiny) -> None:
    """A queued job waits for the next decode (llama.cpp's call lets go of the GIL, so the job's Python does not
    take it from the policy's work), or for the first to wait on it."""
    text = "the sky is blue and the grass is green " * 40
    with Runner(tiny.model, AsrKf(min_cache=64), 160, flash_attn=True) as run:
        imp = run.importance
        imp.background = True
        run.prefill(tiny.tokenize(text)[:400])
        started = threading.Event()
        job = imp._queue(lambda q, qpos, kpos: started.set() or 7, False, np.zeros(1), np.array([1]), np.array([0]))
        assert not started.wait(0.2) and not job.running() and not job.done()
        run.decode(int(np.argmax(run.logits())))
        assert started.wait(10) and job.result() == 7
        job = imp._queue(lambda q, qpos, kpos: 8, False, np.zeros(1), np.array([1]), np.array([0]))
        assert job.result(timeout=10) == 8  # waited for before any decode: handed over then


def test_a_background_re_evaluation_lands_later_with_the_inline_judgement(tiny) -> None:
    """With the layers on a GPU a decode step's re-evaluation queues its host attention on the worker thread and
    lands ``reeval_lag`` steps later; its attention mass is the one the inline computation gives for the same
    queries and keys."""
    text = "the sky is blue and the grass is green " * 40
    with Runner(tiny.model, AsrKf(min_cache=64, reeval_every=8, reeval_lag=4), 160, flash_attn=True) as run:
        pol, imp = run.policy, run.importance
        imp.background = True
        queued, landed = [], []
        job, judge = pol._relevance_job, pol._judge

        def queue(ctx, act, cand):
            done = job(ctx, act, cand)
            q, qpos = imp.recent_queries(pol.relevance_rows)
            queued.append((ctx.step, done, imp.mass(q, qpos, np.concatenate([act, cand]), imp.fold)))
            return done

        def land(ctx):
            landed.append((ctx.step, pol._judging.at, pol._judging.job))
            judge(ctx)

        pol._relevance_job, pol._judge = queue, land
        run.prefill(tiny.tokenize(text)[:400])
        greedy(run, 40)
    at = {id(j): (step, at) for step, at, j in landed}
    delays = []
    for step, done, inline in queued:
        assert np.array_equal(done.result(), inline)
        now, due = at[id(done)]
        delays.append(now - step)  # a prompt chunk's lands at once, a decode step's at its due step
        assert now - step == 0 or now == due == step + 4
    assert 4 in delays and set(delays) <= {0, 4}, delays


def test_policy_thaws_land_in_the_first_free_cells_and_explicit_thaws_go_home(tiny) -> None:
    """A policy's thaw (``PolicyContext.thaw``) puts tokens in the first free cells llama.cpp's search meets, so
    nothing but the tokens is uploaded; ``Session.thaw_positions`` puts each in its home cell (position mod
    cells), which keeps a full thaw bit-exact."""
    text = "the sky is blue and the grass is green " * 40
    with tiny.runner(AsrKf(min_cache=64), 160) as run:
        run.prefill(tiny.tokenize(text)[:400])
        sess = run.session
        sess.freeze_positions(sess.active_positions()[40:100])  # room for what comes back
        frozen = sess.store.positions()
        packed = frozen[frozen < 100][::7][:6]
        first_free = sess.cells.find_slot(len(packed))
        runs = sess.upload_runs
        assert run.thaw(packed, redecode=False) == len(packed)
        assert np.array_equal(sess.cells_of(packed), first_free)
        assert sess.upload_runs - runs == 1 + int(np.count_nonzero(np.diff(first_free) != 1))
        size, rest = sess.cells.size, frozen[~np.isin(frozen, packed)]
        home = rest[sess.cells.seqs[rest % size] == 0]  # frozen tokens whose home cell is free
        home = np.sort(home[np.unique(home % size, return_index=True)[1]][-6:])  # the last free cells
        assert len(home) and not np.array_equal(sess.cells.find_slot(len(home)), home % size)
        assert sess.thaw_positions(home) == len(home)
        assert np.array_equal(sess.cells_of(home), home % size)
        assert sess.kv_stats().active_tokens + sess.kv_stats().frozen_tokens == 400


def test_an_expired_token_comes_back_only_where_it_beats_an_active_one(tiny, monkeypatch) -> None:
    """Rolling re-evaluation in a full cache: expired tokens the queries attend to, but less than to every
    active token, stay frozen (before, any above the freeze bar came back and the weakest active went out:
    thousands of tokens a round at 32k); with weaker active tokens the best come back, at most 64 a round."""
    text = "the sky is blue and the grass is green " * 40
    with tiny.runner(AsrKf(min_cache=64), 160) as run:
        run.prefill(tiny.tokenize(text)[:400])
        pol, sess = run.policy, run.session
        frozen = sess.store.positions()
        free = max(0, run.budget - len(sess.active_positions()))
        pol._ledger.until[frozen] = run.step  # every freeze runs out now
        for active_rel, most in ((10.0, free), (0.0, pol.recover_tokens)):
            rel = lambda runner, a, f, v=active_rel: shares_job(np.full(len(a), v * pol.threshold), np.full(len(f), 2 * pol.threshold))  # noqa: E731
            monkeypatch.setattr(pol, "_relevance_job", rel)
            before = sess.store.is_frozen(frozen)
            pol.after_decode(run, sess.n_logical - 2, 2)
            back = int((before & ~sess.store.is_frozen(frozen)).sum())
            assert back <= most and (back > 0) == (most > 0), (active_rel, back, most)
            pol._ledger.until[sess.store.positions()] = run.step
        assert sess.kv_stats().active_tokens + sess.kv_stats().frozen_tokens == 400  # nothing lost


def test_the_mass_trigger_swaps_in_only_when_frozen_keys_draw_the_query(tiny) -> None:
    """trigger="mass": frozen tokens the current query wants come back when at least trigger_mass of its
    attention would go to frozen keys, and never below that share; nothing is lost either way."""
    text = "the sky is blue and the grass is green " * 40
    for share, fires in ((0.0, True), (1.01, False)):
        pol = AsrKf(min_cache=64, trigger="mass", trigger_every=1, trigger_mass=share)
        with tiny.runner(pol, 160) as run:
            run.prefill(tiny.tokenize(text)[:400])
            assert run.session.kv_stats().frozen_tokens > 0
            for tok in tiny.tokenize(" the sky")[:2]:
                run.decode(tok)
                run.logits()
            assert bool(run.policy.recoveries) == fires
            assert run.session.kv_stats().active_tokens + run.session.kv_stats().frozen_tokens == run.session.n_logical
    # redecode_mass: the swap still happens on every fire, the token is decoded again only above it
    for again, redecoded in ((0.0, True), (1.01, False)):
        pol = AsrKf(min_cache=64, trigger="mass", trigger_every=1, trigger_mass=0.0, redecode_mass=again)
        with tiny.runner(pol, 160) as run:
            run.prefill(tiny.tokenize(text)[:400])
            for tok in tiny.tokenize(" the sky")[:2]:
                run.decode(tok)
            swaps = [r for r in run.policy.recoveries if r.thawed]
            assert swaps, "nothing was swapped in"
            assert all((r.entropy_after is not None) == redecoded for r in swaps)


def test_the_trigger_s_check_is_computed_once_per_query_and_in_the_background_before_a_spike(tiny) -> None:
    """The trigger's check (the newest query's attention over every position, frozen or not) is computed once per
    query, not once per spike; with the tracker in the background it is queued when the query is taken, so a
    spike finds it under way. Either way the swaps and the tokens are the same."""
    text = "the sky is blue and the grass is green " * 40
    seen = {}
    for background, share in ((False, 0.0), (True, 0.0), (False, 1.01), (True, 1.01)):
        with Runner(tiny.model, AsrKf(min_cache=64, trigger="mass", trigger_every=1, trigger_mass=share), 160,
                    flash_attn=True) as run:
            pol, imp = run.policy, run.importance
            imp.background = background
            run.prefill(tiny.tokenize(text)[:400])
            checks, ready, mass, after_logits = [], [], imp._mass_of, pol.after_logits

            def counted(q, qpos, kpos, *a, mass=mass, checks=checks):
                if len(qpos) == 1 and np.array_equal(np.sort(kpos[kpos <= qpos[0]]), np.arange(qpos[0] + 1)):
                    checks.append(int(qpos[0]))  # the check's host attention: one query over every position
                return mass(q, qpos, kpos, *a)

            def spike(ctx, after_logits=after_logits, ready=ready, pol=pol, imp=imp):
                key = (int(imp.recent_queries(1)[1][-1]), imp.generation)
                ready.append(pol._check is not None and pol._check[:2] == key)
                after_logits(ctx)

            imp._mass_of, pol.after_logits = counted, spike
            toks, logits = greedy(run, 40)
            imp._wait()
            seen[background, share] = (toks, logits, [(r.step, r.ranges) for r in pol.recoveries], checks, ready)
            assert run.session.kv_stats().active_tokens + run.session.kv_stats().frozen_tokens == run.n_logical
    for share in (0.0, 1.01):
        (t0, l0, r0, _, _), (t1, l1, r1, _, _) = seen[False, share], seen[True, share]
        assert t0 == t1 and np.array_equal(l0, l1) and r0 == r1
    assert seen[True, 0.0][2] and not seen[True, 1.01][2]  # it fires, or never
    for background in (False, True):
        checks, ready = seen[background, 1.01][3:]
        assert 0 < len(checks) == len(set(checks)) <= 40 // 8 + 2, checks  # once per query, not once per step
        # queued with its query (the prompt's first is made at the first spike) / made at the spike that lacked it
        assert all(ready[1:]) if background else ready.count(False) == len(checks), ready


def _forced(real, pol, ctx: list[int], tail: list[int]):
    """``forced_decode`` at budget 0.35, checking that every token read stays in the cache or the store."""
    from asrkf_edge.bench.suites import forced_decode

    f = forced_decode(real, pol, 0.35, ctx, tail)
    assert f.stats.active_tokens + f.stats.frozen_tokens == f.stats.logical_tokens == len(ctx) + len(tail)
    return f


@pytest.mark.real
def test_asrkf_follow_stays_closer_to_full_than_asrkf_without_recovery(real) -> None:
    """Acceptance (issue 14's KLD): on 48 tokens of prose read after 1,000 at budget 0.35, the policy that swaps
    in what each query wants from the store (asrkf-follow) predicts the next token closer to the full cache
    (mean KL divergence) than the same policy with recovery off, and brings tokens back while doing it."""
    from asrkf_edge.bench.suites import _text_tokens

    tokens = _text_tokens(real, 1048)
    ctx, tail = tokens[:1000], tokens[1000:]
    ref = _forced(real, Full(), ctx, tail)
    near = _forced(real, make_policy("asrkf-follow"), ctx, tail)
    far = _forced(real, make_policy("asrkf-follow", trigger="none"), ctx, tail)
    assert near.stats.recoveries > 0 and far.stats.recoveries == 0, (near.stats.recoveries, far.stats.recoveries)
    assert near.kld(ref) < 0.75 * far.kld(ref), (near.kld(ref), far.kld(ref))


@pytest.mark.real
def test_a_question_s_reselection_is_repaid_when_the_text_moves_on(real) -> None:
    """Issue 14 (KLD on text never tuned on): prose read on after 1,000 tokens of the GFDL at budget 0.35. The
    prompt's last rows reselect the active set as a question would; ``loan`` steps later what that displaced comes
    back where the reading's decayed score prefers it, so the next 80 tokens are predicted much closer to the full
    cache than when the question's set is kept (``loan=0``; measured 0.038 against 0.081 over 96 tokens)."""
    tokens = real.tokenize(GFDL, add_bos=False)[:1096]
    ctx, tail = tokens[:1000], tokens[1000:]
    ref = _forced(real, Full(), ctx, tail)
    repaid, kept = _forced(real, make_policy("asrkf"), ctx, tail), _forced(real, make_policy("asrkf", loan=0), ctx, tail)
    assert repaid.thaws > kept.thaws, (repaid.thaws, kept.thaws)
    assert repaid.kld(ref) < 0.75 * kept.kld(ref), (repaid.kld(ref), kept.kld(ref))


@pytest.mark.real
def test_asrkf_prefetch_brings_back_text_that_comes_again(real) -> None:
    """Issue 14 (recall on any document): when text read long ago comes again (a quoted clause, a name, a
    repeated phrase), asrkf with ``prefetch`` thaws what followed each earlier occurrence of the current bigram
    before the token is decoded, so it predicts the repeat much closer to the full cache than without it."""
    from asrkf_edge.bench.suites import _text_tokens

    ctx = _text_tokens(real, 1000)
    tail = ctx[100:148]  # 48 tokens read 900 tokens ago, long frozen at 35% of the KV
    ref = _forced(real, Full(), ctx, tail)
    near, far = _forced(real, make_policy("asrkf", prefetch=4), ctx, tail), _forced(real, make_policy("asrkf"), ctx, tail)
    assert near.thaws > far.thaws, (near.thaws, far.thaws)
    assert near.kld(ref) < 0.5 * far.kld(ref), (near.kld(ref), far.kld(ref))


@pytest.mark.real
def test_passkey_2k_at_budget_04_asrkf_answers_where_full_does(real) -> None:
    """Acceptance: asrkf within 40% of the prompt answers wherever the full cache does; streaming, with
    the same budget, misses at least once (so the task tells the policies apart)."""
    tok = lambda text: real.tokenize(text, add_bos=real.model.add_bos)  # noqa: E731
    right: dict[tuple[str, float], bool] = {}
    for depth, key in ((0.25, 68231), (0.5, 40917), (0.75, 75302)):
        case = passkey(tok, 2000, depth, key)
        assert 1900 <= case.n_tokens <= 2100
        for policy in ("full", "asrkf", "streaming"):
            r = real.generate(case.prompt, 8, policy=policy, budget=0.4, chat=False)
            right[policy, depth] = case.correct(r.text)
            if policy != "full":
                assert r.stats.kv.active_tokens_peak <= 0.4 * r.stats.prompt_tokens
    depths = (0.25, 0.5, 0.75)
    assert any(right["full", d] for d in depths), right
    assert all(right["asrkf", d] for d in depths if right["full", d]), right
    assert not all(right["streaming", d] for d in depths), right


@pytest.mark.real
def test_recoveries_bring_thawed_ranges_back_over_500_tokens(real) -> None:
    """Acceptance: over 500 generated tokens the entropy ladder (trigger="entropy"; the default also asks for
    attention mass on frozen keys and did not fire here) fires, and each recovery's ranges are in
    the cache right after it (kv_stats, the store) and the logits the sampler uses are the re-decoded ones."""
    prompt = GPL[:7000]  # the model continues the licence text
    seen: list[dict] = []
    checked: list[int] = []
    last = {"thaw_events": 0}

    def check(run) -> None:
        stats = run.session.kv_stats()
        for rec in run.policy.recoveries[len(seen):]:
            want = np.concatenate([np.arange(a, b) for a, b in rec.ranges])
            assert len(want) == rec.thawed > 0
            assert not run.session.store.is_frozen(want).any()
            assert np.isin(want, run.session.active_positions()).all()
            assert stats.thaw_events > last["thaw_events"]
            seen.append(rec.as_dict())
        if run.policy.recoveries and run.policy.recoveries[-1].position == run.session.n_logical:  # recovered on this token
            from asrkf_edge.importance import entropy

            assert abs(float(entropy(run.logits())) - run.policy.recoveries[-1].entropy_after) < 1e-9
            assert run.policy.recoveries[-1].entropy_after != run.policy.recoveries[-1].entropy
            checked.append(run.step)
        last.update(stats.as_dict())

    r = real.generate(prompt, 500, policy=AsrKf(trigger="entropy"), budget=0.4, chat=False, on_token=check)
    assert r.stats.generated_tokens == 500, r.stats.stop_reason
    assert r.stats.kv.recoveries == len(seen) == len(checked) >= 1
    assert r.stats.kv.active_tokens_peak <= 0.4 * r.stats.prompt_tokens
    assert r.stats.kv.active_tokens + r.stats.kv.frozen_tokens == r.stats.kv.logical_tokens


def test_context_shift_drops_half_and_renumbers_like_llama_cpp(tiny) -> None:
    """The llama.cpp baseline: when full, the older half after the sinks goes and positions close the gap,
    so llama.cpp's highest position stays below the cache size however long the text."""
    prompt = "the sky is blue and the grass is green " * 15
    with tiny.runner("shift", 100) as run:
        run.prefill(tiny.tokenize(prompt, add_bos=False))
        s = run.session
        for _ in range(40):
            run.decode(int(np.argmax(run.logits())))
        st = run.stats()
        assert st.dropped_tokens == s.shifted > 0
        assert st.active_tokens + st.dropped_tokens == st.logical_tokens
        assert s.ctx.seq_pos_max(0) == st.active_tokens - 1 < 100  # positions contiguous from 0
        assert np.array_equal(s.active_positions(), np.arange(st.active_tokens))


@pytest.mark.real
def test_quantized_caches_hold_everything_in_fewer_bytes(real) -> None:
    """llama.cpp's q8_0/q4_0 caches (blocks of 32 values: the tiny model's head dim 16 cannot use them)."""
    prompt = "the sky is blue and the grass is green " * 15
    full = real.generate(prompt, 8, policy="full", chat=False).stats.kv
    for name, ratio in (("q8_0", 34 / 64), ("q4_0", 18 / 64)):  # bytes per 32 values vs f16's 64
        st = real.generate(prompt, 8, policy=name, budget=0.1, chat=False).stats.kv  # the budget does not apply
        assert st.active_tokens_peak == full.active_tokens_peak and st.dropped_tokens == 0
        assert st.active_kv_bytes == pytest.approx(ratio * full.active_kv_bytes)


@pytest.mark.real
@pytest.mark.parametrize("name", policy_names(bench=True))
def test_every_registered_policy_runs_a_generation(real, name: str) -> None:
    """Each policy the registry lists (CLI choices, bench order) generates through the one engine, keeps to its
    budget, and accounts for every token: active + frozen (+ dropped) = logical."""
    prompt = "the sky is blue and the grass is green " * 40
    st = real.generate(prompt, 8, policy=name, budget=0.5, chat=False).stats
    assert st.generated_tokens > 0 and st.kv.policy == name
    kv = st.kv
    assert kv.active_tokens + kv.frozen_tokens + kv.dropped_tokens == kv.logical_tokens
    pol = make_policy(name)
    if pol.bounded:
        assert kv.active_tokens_peak <= max(0.5 * st.prompt_tokens, pol.min_cells()) + 1
    if pol.reversible:
        assert kv.dropped_tokens == 0 and kv.frozen_tokens > 0


def test_lowest_groups_takes_whole_groups_by_their_best_score() -> None:
    from asrkf_edge.policies.selection import lowest_groups

    scores, group = np.array([5.0, 1.0, 2.0, 9.0, 0.0, np.inf]), np.array([0, 0, 1, 1, 2, 2])
    # group 2 holds the lowest token but also a pinned one (inf): it leaves only when it is needed
    assert lowest_groups(scores, group, 1, 2).tolist() == [True, True, False, False, False, False]
    assert lowest_groups(scores, group, 1, 4).tolist() == [True, True, True, True, False, False]
    assert lowest_groups(scores, group, 5, 5).all()


def test_a_challenger_takes_a_free_cell_or_beats_the_weakest_left() -> None:
    """The swap rule of the rolling re-evaluation and of recoveries: free cells first, then the i-th best
    frozen token against the i-th weakest active one, stopping at the first that loses."""
    from asrkf_edge.policies.selection import winners

    best_first, weakest_first = np.array([0.9, 0.5, 0.4, 0.3]), np.array([0.1, 0.2, 0.45])
    assert winners(best_first, weakest_first, 0) == 2  # 0.9 > 0.1, 0.5 > 0.2, then 0.4 < 0.45 stops it
    assert winners(best_first, weakest_first, 1) == 3  # a free cell, 0.5 > 0.1, 0.4 > 0.2, then 0.3 < 0.45
    assert winners(best_first, np.zeros(0), 2) == 2  # nothing to displace: only the free cells
    assert winners(np.zeros(0), weakest_first, 3) == 0


def test_selection_pools_neighbours_and_fills_whole_pages() -> None:
    from asrkf_edge.policies.selection import choose, combine, pool

    s = np.array([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    assert pool(s, 3).tolist() == [[0.0, 5.0, 5.0, 5.0, 0.0, 1.0, 1.0, 1.0]]  # a fact keeps its neighbours
    assert pool(s, 1) is s
    rng = np.random.default_rng(4)
    for kernel in (2, 4, 15):  # the max over every centred window, as NumPy's sliding windows define it
        x = rng.random((3, 2, 50))
        x[..., 7] = -np.inf
        half = kernel // 2
        padded = np.pad(x, [(0, 0), (0, 0), (half, kernel - 1 - half)], constant_values=-np.inf)
        assert np.array_equal(pool(x, kernel), np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1).max(-1))
    heads = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert combine(heads, "mean").tolist() == [0.5, 1.5] and combine(heads, "max").tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="head combination"):
        combine(heads, "median")  # type: ignore[arg-type]
    score = np.array([9.0, 0.1, 0.2, 8.0, 0.3, 0.0, 0.0, 7.0, 0.5, 0.6])
    forced = np.zeros(10, bool)
    forced[-1] = True
    keep = choose(score, forced, 4)
    assert np.flatnonzero(keep).tolist() == [0, 3, 7, 9]  # forced first, then the best tokens
    keep = choose(score, forced, 6, page=3)  # pages [0,3) [3,6) [6,9) [9]: the best two whole pages, then tokens
    assert keep.sum() == 6 and keep[[0, 1, 2, 9]].all() and keep[3:6].sum() + keep[6:9].sum() == 2
    assert choose(score, np.ones(10, bool), 4).all()  # forced positions always stay


def _follow_up(real, policy) -> str:
    """A multi-turn chat read turn by turn as a chat reads it: the document (with its fact) and two side
    turns first, then the question's turn; greedy answer under a 35% budget."""
    case = needle_multiturn(real, 1000, 0.25, 2)  # the ship's name, asked two unrelated turns later
    cut = case.prompt.rindex("<|im_start|>user")
    first = real.tokenize(case.prompt[:cut], add_bos=real.model.add_bos)
    last = real.tokenize(case.prompt[cut:], add_bos=False)
    with real.runner(policy, budget_cells(policy, 0.35, len(first) + len(last), 24)) as run:
        run.prefill(first)
        run.prefill(last)
        sampler = Sampler()
        try:
            text = real.detokenize(list(generate_step(run, sampler, 24, real.model.is_eog)))
        finally:
            sampler.close()
        assert run.stats().active_tokens_peak <= run.budget
    return text


@pytest.mark.real
def test_the_question_turn_reselects_what_it_needs(real) -> None:
    """A follow-up that a cache choosing only by past attention misses (asrkf without the question-time
    reselection gives another name) is answered when the new turn chooses the active set again from every
    token, frozen ones included, by the question's own attention."""
    assert "silver heron" not in _follow_up(real, AsrKf(question=False)).lower()
    assert "silver heron" in _follow_up(real, AsrKf()).lower()


@pytest.mark.real
def test_a_reply_s_first_tokens_recall_what_the_question_needs(real) -> None:
    """The same follow-up without the question-time reselection: with ``recall_reply`` (off by default) the frozen
    tokens that each layer's query of the reply's first tokens wants most are lent to that layer, and the ship is
    named."""
    assert "silver heron" in _follow_up(real, AsrKf(question=False, recall_reply=32)).lower()


@pytest.mark.real
def test_reading_the_prompt_twice_keeps_what_its_question_needs(real) -> None:
    """The bench's 1k needle case 4 (flash attention on, as the bench runs): asrkf, reading the prompt once under
    a 0.35 budget, names the wrong thing; asrkf-twice reads it again keeping the tokens the first read's question
    chose, so the text after the fact is computed with the fact in view, and answers."""
    eng = Engine(real.model, flash_attn=True)
    case = needle(eng, 1000, 0.5, 4)
    if not case.correct(eng.generate(case.prompt, 24, policy="full", chat=False).text):
        # a marginal case: llama.cpp built for another CPU (a 2-core EPYC with AVX2 only) misses it with every cell
        pytest.skip("full misses this case on this host's llama.cpp build: nothing for a second read to keep")
    once = eng.generate(case.prompt, 24, policy="asrkf", budget=0.35, chat=False)
    twice = eng.generate(case.prompt, 24, policy="asrkf-twice", budget=0.35, chat=False)
    assert not case.correct(once.text) and case.correct(twice.text)
    st = twice.stats.kv
    assert st.frozen_tokens > 0 and st.active_tokens_peak <= st.budget_tokens  # the second read kept to the budget
    assert st.active_tokens + st.frozen_tokens == st.logical_tokens == twice.stats.prompt_tokens + twice.stats.generated_tokens


@pytest.mark.real
@pytest.mark.parametrize("name, k_type, v_type, share", [("asrkf-q8_0", 8, 8, 34 / 64), ("asrkf-q4_0", 2, 2, 18 / 64),
                                                         ("asrkf-q8_0-q4_0", 8, 2, 52 / 128)])
def test_asrkf_over_a_quantized_cache(real, name: str, k_type: int, v_type: int, share: float) -> None:
    """asrkf-q8_0, asrkf-q4_0 and asrkf-q8_0-q4_0 (q8_0 keys, q4_0 values): llama.cpp's quantized rows in the active
    cache and the store, copied as they are: each answers a needle case as asrkf over f16 does, in 34/64, 18/64 or
    52/128 of the bytes per token."""
    case = needle(real, 1000, 0.5, 2)
    f16 = real.generate(case.prompt, 24, policy="asrkf", budget=0.35, chat=False)
    quantized = real.runner(name, budget_cells(make_policy(name), 0.35, case.n_tokens, 24))
    with quantized as run:
        run.prefill(real.tokenize(case.prompt, add_bos=real.model.add_bos))
        sampler = Sampler()
        try:
            text = real.detokenize(list(generate_step(run, sampler, 24, real.model.is_eog)))
        finally:
            sampler.close()
        st = run.stats()
        store = run.session.store
        assert store is not None and (store.layout.k_type, store.layout.v_type) == (k_type, v_type)  # rows frozen as they are
    assert case.correct(f16.text) and case.correct(text)
    assert st.kv_bytes_per_token == pytest.approx(f16.stats.kv.kv_bytes_per_token * share)
    assert st.frozen_tokens > 0 and st.active_tokens + st.frozen_tokens == st.logical_tokens


def test_bigram_index_finds_earlier_occurrences_newest_first() -> None:
    from asrkf_edge.policies.induction import BigramIndex, continuations

    toks = [5, 1, 2, 9, 1, 2, 7, 1, 2]
    idx = BigramIndex()
    idx.sync(6, lambda a, b: toks[a:b])
    idx.sync(9, lambda a, b: toks[a:b])  # read in two pieces, as a prompt and its decodes are
    assert idx.last == 2
    assert idx.matches(1, 2, 5).tolist() == [8, 5, 2]
    assert idx.matches(1, 2, 2).tolist() == [8, 5]
    assert idx.matches(9, 1, 5).tolist() == [4] and idx.matches(2, 1, 5).tolist() == []
    assert continuations(np.array([5, 2]), 2, 8).tolist() == [2, 3, 4, 5, 6, 7]
    idx.sync(4, lambda a, b: [3, 3, 3, 3][a:b])  # rewound and replaced: the old bigrams are gone
    assert idx.matches(1, 2, 5).tolist() == [] and idx.matches(3, 3, 5).tolist() == [3, 2, 1]
