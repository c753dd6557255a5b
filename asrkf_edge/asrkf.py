"""ASR-KF-EGR: adaptive soft rolling KV freeze with entropy-guided recovery (arXiv 2512.11221).

Every ``reeval_every`` decode steps (and after every prefill chunk) the policy
1. brings back frozen tokens that the newest queries would attend to strongly (scored against their
   mirrored keys) and, into free cells, those whose freeze ran out and that these queries attend to at
   least at the freeze bar; an expired token below it is frozen again, for longer (rolling),
2. freezes active tokens whose decayed attention is below ``threshold`` / logical tokens, each for
   ``schedule.duration(count)`` steps (sublinear in how often it was found unimportant).
When the next-token entropy spikes it thaws by a ladder: (1) the frozen ranges most relevant to the
current query, (2) everything frozen in the recent window, (3) as much as fits, resetting counts; each
step of the ladder is taken when the spike persists, and the token is re-decoded with what came back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .importance import entropy
from .policy import Attention, Policy
from .recovery import EntropyMonitor, EntropyRule, Recovery
from .schedule import Ledger, Schedule
from .session import runs

if TYPE_CHECKING:
    from .runner import Runner
    from .session import Session

_RELEVANCE_ROWS = 8  # newest queries used to score frozen keys (a prefill chunk has up to `window`)


@dataclass
class AsrKf(Policy):
    """ASR-KF-EGR. Defaults measured on SmolLM2-135M (see README, "Choosing the defaults").

    budget: the cache is 40% of the prompt unless generate() says otherwise (never below min_cache, 512):
    freed cells save memory only when the llama.cpp cache itself is that small.
    min_cache: also the context length before attention alone freezes anything (below it freeze/thaw
    churn cost 2 ms a token on a 300-token context and saves little).
    threshold: freeze when decayed attention < threshold x the uniform share 1/logical tokens (a fixed bar:
    measured against the active count it would rise as tokens leave, and freeze nearly everything).
    schedule: freeze duration law (base x sqrt(count) decode steps).
    reeval_every: decode steps between re-evaluations.
    thaw_relevance: a frozen token the newest queries would give >= this x the uniform share comes back.
    entropy: spike rule. recover_tokens, recover_span: level-1 thaw size and neighbours taken with each
    relevant token. recover_recent: level-2 window. escalate_within: steps in which a new spike climbs
    the ladder. pin: steps a thawed token may not be frozen again.
    """

    name: ClassVar[str] = "asrkf"
    reversible: ClassVar[bool] = True
    attention: ClassVar[Attention] = "ema"

    recent: int = 32
    budget: float | None = 0.4
    threshold: float = 0.5
    schedule: Schedule = field(default_factory=Schedule)
    reeval_every: int = 16
    thaw_relevance: float = 4.0
    entropy: EntropyRule = field(default_factory=EntropyRule)
    recover_tokens: int = 64
    recover_span: int = 8
    recover_recent: int = 256
    escalate_within: int = 4
    pin: int = 32
    _ledger: Ledger = field(init=False, repr=False)
    _monitor: EntropyMonitor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        if self.reeval_every < 1 or self.window < 1 or self.pin < 0:
            raise ValueError("reeval_every and window must be >= 1, pin >= 0")
        self._ledger = Ledger(self.schedule)
        self._monitor = EntropyMonitor(self.entropy)

    # eviction under a hard budget
    def score(self, runner: Runner, positions: np.ndarray) -> np.ndarray:
        s = runner.importance_of(positions)
        return np.where(self._ledger.is_pinned(positions, runner.step), np.inf, s)

    def on_evict(self, runner: Runner, positions: np.ndarray) -> None:
        self._ledger.frozen(positions, runner.step)

    # rolling re-evaluation
    def after_decode(self, runner: Runner, pos0: int, n: int) -> None:
        session, step = runner.session, runner.step
        if (n == 1 and step % self.reeval_every) or session.n_logical < self.min_cache:
            return
        self._ledger.grow(session.n_logical)
        frozen = session.store.positions() if session.store is not None else np.zeros(0, np.int64)
        if len(frozen):
            rel = self._relevance(runner, frozen)
            hot = rel >= self.thaw_relevance
            back = self._around(frozen[hot][np.argsort(-rel[hot], kind="stable")], frozen, self._thaw_cap(session))
            if len(back) and self._thaw(runner, back, self.pin):
                runner.stale_logits = True
            # expired tokens are judged where they lie, from their mirrored keys: those the newest queries
            # attend to at least at the freeze bar come back into free cells, the rest stay frozen for longer
            # (count + 1) rather than make a round trip through the cache only to be frozen again
            due = np.isin(frozen, self._ledger.expired(step)) & ~np.isin(frozen, back)
            up = due & (rel >= self.threshold)
            self._ledger.frozen(frozen[due & ~up], step)
            room = session.free_cells() - session.budget // 16
            if room > 0 and up.any():
                self._thaw(runner, frozen[up][np.argsort(-rel[up], kind="stable")][:room], 0)
        act = session.active_positions()
        cand = act[~session.protected(act)]
        cand = cand[~self._ledger.is_pinned(cand, step)]
        low = cand[runner.importance_of(cand) < self.threshold / session.n_logical]
        if len(low):
            session.freeze_positions(low)
            self._ledger.frozen(low, step)

    # entropy-guided recovery
    def after_logits(self, runner: Runner) -> None:
        session = runner.session
        if session.store is None or not session.store.frozen_tokens:
            return  # nothing to recover: the entropy is watched while something is frozen
        h = float(entropy(runner.logits()))
        threshold = self._monitor.threshold()
        if not self._monitor.observe(h):
            return
        last = runner.recoveries[-1] if runner.recoveries else None
        level = min(last.level + 1, 3) if last and runner.step - last.step <= self.escalate_within else 1
        rec = Recovery(runner.step, session.n_logical, h, threshold, level)
        want = self._ladder(runner, level)
        rec.thawed = self._thaw(runner, want, self.pin)
        rec.ranges = runs(np.sort(want)) if rec.thawed else []
        if rec.thawed:
            runner.redecode_last()
            rec.entropy_after = float(entropy(runner.logits()))
        runner.recoveries.append(rec)

    def _ladder(self, runner: Runner, level: int) -> np.ndarray:
        session = runner.session
        assert session.store is not None
        frozen = session.store.positions()
        rel = self._relevance(runner, frozen)
        ranked = frozen[np.argsort(-rel, kind="stable")]
        cap = self._thaw_cap(session)
        if level == 1:
            return self._around(ranked, frozen, min(cap, self.recover_tokens))
        if level == 2:
            recent = ranked[ranked >= session.n_logical - self.recover_recent]
            return recent[:cap] if len(recent) else ranked[: min(cap, self.recover_tokens)]
        self._ledger.reset_counts()
        return ranked[:cap]

    # helpers
    def _relevance(self, runner: Runner, frozen: np.ndarray) -> np.ndarray:
        """Most attention any of the newest queries would give each frozen token, in uniform shares,
        normalised jointly with the active tokens (keys from the mirror: the rows the store holds)."""
        imp = runner.importance
        assert imp is not None
        act = runner.session.active_positions()
        q = imp.queries()[:, -_RELEVANCE_ROWS:]
        n = runner.session.n_logical
        qpos = np.arange(n - q.shape[1], n, dtype=np.int64)
        kpos = np.concatenate([act, frozen])
        mass = imp.mass(q, qpos, kpos).max(axis=0)
        return mass[len(act):] * len(kpos)

    def _around(self, ranked: np.ndarray, frozen: np.ndarray, limit: int) -> np.ndarray:
        """Frozen ranges of ``recover_span`` tokens each side of the best-ranked positions, at most ``limit``
        tokens: a fact spans several tokens and attention finds only some of them."""
        offsets = np.arange(-self.recover_span, self.recover_span + 1)
        taken = np.zeros(0, np.int64)
        for p in ranked[: max(limit, 0)].tolist():
            near = p + offsets
            near = near[np.isin(near, frozen) & ~np.isin(near, taken)]
            if len(taken) + len(near) > limit:
                break
            taken = np.concatenate([taken, near])
        return np.sort(taken)

    def _thaw_cap(self, session: Session) -> int:
        """Most tokens one thaw may bring back: room is made by freezing others, never protected ones."""
        return max(0, (session.budget - session.sinks - session.recent) // 2)

    def _thaw(self, runner: Runner, positions: np.ndarray, pin: int) -> int:
        if len(positions) == 0:
            return 0
        session = runner.session
        n = session.thaw_positions(positions)
        self._ledger.thawed(positions, runner.step, pin)
        imp = runner.importance
        assert imp is not None
        imp.scores[positions] = 1.0 / session.n_logical
        return n
