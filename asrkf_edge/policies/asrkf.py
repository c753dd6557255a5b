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
from typing import Any, ClassVar

import numpy as np

from ..importance import entropy
from ..session import runs
from .base import Attention, PolicyContext, ScoringPolicy
from .recovery import EntropyMonitor, EntropyRule, Recovery
from .schedule import Ledger, Schedule

_RELEVANCE_ROWS = 8  # newest queries used to score frozen keys (a prefill chunk has up to `window`)


@dataclass
class AsrKf(ScoringPolicy):
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
    recoveries: list[Recovery] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        if self.reeval_every < 1 or self.window < 1 or self.pin < 0:
            raise ValueError("reeval_every and window must be >= 1, pin >= 0")
        self._ledger = Ledger(self.schedule)
        self._monitor = EntropyMonitor(self.entropy)
        self.recoveries = []

    def recovery_log(self) -> list[dict[str, object]]:
        return [r.as_dict() for r in self.recoveries]

    def state(self) -> dict[str, Any]:
        return {"ledger": self._ledger.state(), "monitor": self._monitor.state(),
                "recoveries": [r.as_dict() for r in self.recoveries]}

    def load_state(self, state: dict[str, Any]) -> None:
        self._ledger.load_state(state["ledger"])
        self._monitor.load_state(state["monitor"])
        self.recoveries = [Recovery.from_dict(d) for d in state["recoveries"]]

    # eviction under a hard budget
    def score(self, ctx: PolicyContext, positions: np.ndarray) -> np.ndarray:
        s = ctx.importance.of(positions)
        return np.where(self._ledger.is_pinned(positions, ctx.step), np.inf, s)

    def on_evict(self, ctx: PolicyContext, positions: np.ndarray) -> None:
        self._ledger.frozen(positions, ctx.step)

    # rolling re-evaluation
    def after_decode(self, ctx: PolicyContext, pos0: int, n: int) -> None:
        step = ctx.step
        if (n == 1 and step % self.reeval_every) or ctx.n_logical < self.min_cache:
            return
        self._ledger.grow(ctx.n_logical)
        frozen = ctx.frozen()
        if len(frozen):
            rel = self._relevance(ctx, frozen)
            hot = rel >= self.thaw_relevance
            back = self._around(frozen[hot][np.argsort(-rel[hot], kind="stable")], frozen, self._thaw_cap(ctx))
            self._thaw(ctx, back, self.pin)
            # expired tokens are judged where they lie, from their mirrored keys: those the newest queries
            # attend to at least at the freeze bar come back into free cells, the rest stay frozen for longer
            # (count + 1) rather than make a round trip through the cache only to be frozen again
            due = np.isin(frozen, self._ledger.expired(step)) & ~np.isin(frozen, back)
            up = due & (rel >= self.threshold)
            self._ledger.frozen(frozen[due & ~up], step)
            room = ctx.free_cells() - ctx.budget // 16
            if room > 0 and up.any():
                self._thaw(ctx, frozen[up][np.argsort(-rel[up], kind="stable")][:room], 0, redecode=False)
        act = ctx.active()
        cand = act[~ctx.protected(act)]
        cand = cand[~self._ledger.is_pinned(cand, step)]
        low = cand[ctx.importance.of(cand) < self.threshold / ctx.n_logical]
        if len(low):
            ctx.freeze(low)
            self._ledger.frozen(low, step)

    # entropy-guided recovery
    def after_logits(self, ctx: PolicyContext) -> None:
        if not ctx.n_frozen:
            return  # nothing to recover: the entropy is watched while something is frozen
        h = float(entropy(ctx.logits()))
        threshold = self._monitor.threshold()
        if not self._monitor.observe(h):
            return
        last = self.recoveries[-1] if self.recoveries else None
        level = min(last.level + 1, 3) if last and ctx.step - last.step <= self.escalate_within else 1
        rec = Recovery(ctx.step, ctx.n_logical, h, threshold, level)
        want = self._ladder(ctx, level)
        rec.thawed = self._thaw(ctx, want, self.pin)
        rec.ranges = runs(np.sort(want)) if rec.thawed else []
        if rec.thawed:
            ctx.redecode()
            rec.entropy_after = float(entropy(ctx.logits()))
        self.recoveries.append(rec)

    def _ladder(self, ctx: PolicyContext, level: int) -> np.ndarray:
        frozen = ctx.frozen()
        rel = self._relevance(ctx, frozen)
        ranked = frozen[np.argsort(-rel, kind="stable")]
        cap = self._thaw_cap(ctx)
        if level == 1:
            return self._around(ranked, frozen, min(cap, self.recover_tokens))
        if level == 2:
            recent = ranked[ranked >= ctx.n_logical - self.recover_recent]
            return recent[:cap] if len(recent) else ranked[: min(cap, self.recover_tokens)]
        self._ledger.reset_counts()
        return ranked[:cap]

    # helpers
    def _relevance(self, ctx: PolicyContext, frozen: np.ndarray) -> np.ndarray:
        """Most attention any of the newest queries would give each frozen token, in uniform shares,
        normalised jointly with the active tokens (keys from the mirror: the rows the store holds)."""
        imp = ctx.importance
        act = ctx.active()
        q = imp.queries()[:, -_RELEVANCE_ROWS:]
        n = ctx.n_logical
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

    def _thaw_cap(self, ctx: PolicyContext) -> int:
        """Most tokens one thaw may bring back: room is made by freezing others, never protected ones."""
        return max(0, (ctx.budget - self.sinks - self.recent) // 2)

    def _thaw(self, ctx: PolicyContext, positions: np.ndarray, pin: int, redecode: bool = True) -> int:
        if len(positions) == 0:
            return 0
        n = ctx.thaw(positions, redecode=redecode)
        self._ledger.thawed(positions, ctx.step, pin)
        ctx.importance.scores[positions] = 1.0 / ctx.n_logical
        return n
