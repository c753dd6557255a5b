"""ASR-KF-EGR: adaptive soft rolling KV freeze with entropy-guided recovery (arXiv 2512.11221).

When a prompt (or a chat turn) has been read, the active set is chosen again from every logical token by the
attention of the question's own query rows (SnapKV's observation window, pooled, per head), filling the budget;
frozen tokens the question needs come back and the newest tokens are read again with them. The reselection is a
loan: ``loan`` tokens into the reply, what it displaced comes back where the decayed score still prefers it.
While decoding, a full cache evicts the tokens with the least decayed attention into the frozen store, each for
``schedule.duration(count)`` steps (sublinear in how often it was found unimportant). Every ``reeval_every``
steps the tokens whose freeze ran out are judged where they lie, from their mirrored keys: one comes back only
where it beats an active token (rolling), the rest stay frozen for longer. ``trigger`` says when generation
itself brings frozen context back: on an entropy spike whose query would put real attention mass on frozen keys
(default), on either alone, or never.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np

from ..importance import entropy
from ..session import runs
from .base import GGML_Q4_0, GGML_Q8_0, Attention, PolicyContext, ScoringPolicy
from .induction import BigramIndex, continuations
from .recovery import EntropyMonitor, EntropyRule, Recovery
from .schedule import Ledger, Schedule
from .selection import Combine, choose, combine, pool, winners

Trigger = Literal["none", "entropy", "mass", "entropy-mass"]


@dataclass
class _Judging:
    """A re-evaluation under way: the attention mass being computed, what it judges, the step it lands at."""

    job: Future[np.ndarray]
    act: np.ndarray
    cand: np.ndarray
    due: np.ndarray
    at: int


@dataclass
class _Loan:
    """What a question's reselection froze and the decayed scores it had then, due back at step ``at``."""

    at: int
    positions: np.ndarray
    scores: np.ndarray


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
    reeval_every: decode steps between re-evaluations. 64: the re-evaluation's host attention (8 query rows over
    every active and expired key) cost 23 ms a call at 32k on an H200's host (default shape) and 14-18 ms at 8k on
    2 CPU cores; mean KLD over six texts (the bench's and five licences; benchmarks/kld_variants.py [--text ...],
    context 2000, 128 tokens) 0.0673 / 0.0348 at budget 0.35 / 0.5 against 0.0671 / 0.0352 every 32nd step (every
    16th, on two texts: no better than 32nd).
    relevance_rows: newest query rows that judge expired tokens (8; 2 gave mean KLD 0.0694 / 0.0380 over the six).
    reeval_lag: with the layers on a GPU, decode steps from a re-evaluation's queries to its landing, its host
    attention computed beside the decodes in between. 8: on five licence texts (benchmarks/kld_variants.py
    --gpu-mode --text ..., context 2000, 128 tokens, budget 0.35) mean KLD 0.0641 against 0.0649 computed at once,
    0.0690 at 16 and 0.0687 at the next step: single texts moved by up to 0.02 either way, the mean did not.
    thaw_relevance: a frozen token the newest queries would give >= this x the uniform share comes back.
    entropy: spike rule. recover_tokens, recover_span: level-1 thaw size and neighbours taken with each
    relevant token. recover_recent: level-2 window. escalate_within: steps in which a new spike climbs
    the ladder. pin: steps a thawed token may not be frozen again. redecode_mass: after a swap, the token is
    decoded again only when at least this share of its attention went to frozen keys (below it, what came back
    serves the next token). evict_cells: a full cache frees groups of 8 neighbouring cells (ScoringPolicy):
    measured at budget 0.35, 128 forced tokens, the cells thawed later came back in 35 / 33 / 45 runs instead
    of 154 / 179 / 291 (two texts at 2k, one at 4k), KLD 0.079 / 0.068 / 0.059 against 0.079 / 0.069 / 0.062.
    A swap (below) still evicts token by token: in groups, asrkf-follow's KLD rose from 0.029 to 0.035.
    recall_prompt_rows, recall_prompt_size, recall_prompt_tail, recall_ratio: the chunks of a prompt's newest
    2,048 tokens are read with recall (:mod:`asrkf_edge.recall`; CPU caches only): in each layer, up to 512 frozen
    tokens that the chunk's query rows attend to more than 4x an active token's share take its cells for that chunk.
    Measured (2-core Xeon, default model): bench needle 4k (`--flash-attn --budgets 0.35,0.5`) multi-turn 3 -> 5 of
    full's 6 at 0.35 and 3 -> 4 at 0.5, needle 8 and 8 either way (full 7); KLD at 2k (the bench's text, 128 tokens)
    0.0781 -> 0.0663 at 0.35 and 0.0480 -> 0.0417 at 0.5. Decoding is not touched (16.7 ms a token at 4k either
    way); reading a prompt is: 7.8 -> 9.6 s at 2k, 18.3 -> 25.0 s at 4k (flash attention off). On prose and facts
    never tuned on (benchmarks/other_prose.py, 1k and 2k, 0.35, 40 cases): 22 right against 17 without it (full 17).
    recall_reply, recall_reply_size: with ``recall_reply`` above 0 (off by default), the first that many decodes after
    a prompt lend up to ``recall_reply_size`` frozen tokens a layer as asrkf-recall's decodes do, and the question
    read again after the reselection goes in decodes of 8 that recall the same way. 32 and 128 (2-core Xeon): KLD at
    2k 0.0663 -> 0.0510 at 0.35 and 0.0417 -> 0.0310 at 0.5 (the first 32 tokens' 0.080 -> 0.025, asrkf-recall's),
    4k 0.35 decode 2.07x -> 1.88x of full's speed; on the bench's cases (tuned on) as many answers (one gained, one
    lost at 0.35), but on prose and facts never tuned on (benchmarks/other_prose.py, Apache-2.0 + MPL-2.0, 1k and
    2k, 0.35, 40 cases) 15 right against 22 without it (full 17): seven lost, none gained. Two of the replies it
    spoiled recite the licence ("The Covered Software is governed by ..."); in one, full wins the deciding token by
    0.40 nats and the reply's recall, closer to full there (KLD 0.035 against 0.177), still tips it ("light blue"
    for "bright orange"). Decoding lends nothing by default (twenty-fourth session).
    ``recall``: rows lent in every decode (asrkf-recall).
    observe_every: one captured decode in 8 (the base's 4 for the other scoring policies): a captured decode
    costs llama.cpp its CUDA graphs. On an H200 (random-id prompts, medians of 3) every 8th instead of every 4th
    decoded 336.7 / 266.2 tok/s against 262.1 / 232.3 at 4k / 16k (default model's shape) and 114.5 / 94.2
    against 98.5 / 61.2 (8B shape); KLD at 2k (128 tokens) 0.0785 / 0.0443 against 0.0786 / 0.0474 at budget
    0.35 / 0.5 (every 16th: 0.0806 at 0.35).
    gpu_fold_layers: with the layers on a GPU, 4 of the captured layers feed the decayed score, the re-evaluation
    and the trigger's check, and every decode is cut at their queries, instead of 8: LLaMA-3-8B shape on an H100
    (benchmarks/gpu_breakdown.py, one process, medians of 3) 0.86x / 0.87x / 0.95x of full's decode at 4k / 16k /
    32k against 0.81x / 0.81x / 0.89x (llama.cpp's decode call 0.1-0.3 ms a token shorter, the rest fewer
    recoveries in those runs). Mean KLD over four texts as on a GPU (context 2000, 128 tokens, budget 0.35) 0.0628
    against 0.0620 (2 layers: 0.0771). Not on the CPU, where it buys no speed: a chat whose replies the model writes
    (benchmarks/chat_turns.py, flash attention off, 16 cases) gave 1 answer with 4 layers against 4 with 8 (full 3).
    loan: decode steps after a question's reselection at which up to ``recover_tokens`` of the tokens it froze come
    back where the reading's decayed score prefers them (:meth:`_repay`; 0: the question's set and scores stay).
    Measured (benchmarks/kld_variants.py, context 2000, 128 tokens, 0.35, 2-core EPYC; twenty-ninth session) mean
    KLD over the bench's text and five licences 0.0652 -> 0.0515 (on a GPU's path, --gpu-mode, GFDL-1.3 / MPL-2.0
    0.104 / 0.113 -> 0.054 / 0.090); the bench's needle and multi-turn answers as before at 1k-4k, passkey at 1k.
    Repaid over the question's picks too (not pinned): the same KLD (0.060) but a 1k multi-turn answer lost, its
    fact 18 tokens into the reply; what left judged by the newest rows' attention instead: less gained (MPL-2.0
    0.103 against 0.088); the question choosing only a share of the budget: needle 1k 9 -> 7 at a quarter.
    read_twice: a prompt that did not fit is read a second time keeping, from the moment each is read, the
    ``keep_share`` of the budget its question scored highest (:meth:`read_again`; the policy ``asrkf-twice``). Off
    by default: it doubles the prompt's reading time (4k: 11.2 -> 21.6 s median on 2 EPYC cores) for one more
    answer in ten on the bench's 4k needle and multi-turn and 1k needle at budget 0.35, none lost (50 cases), and
    no gain in KLD (mean over six texts 0.0673 either way at 0.35; 0.0389 against 0.0348 at 0.5). keep_share 0.15
    lost a 4k multi-turn answer that 0.25 and 0.4 gave.
    """

    name: ClassVar[str] = "asrkf"
    reversible: ClassVar[bool] = True
    attention: ClassVar[Attention] = "ema"

    recent: int = 32
    observe_every: int = 8
    gpu_fold_layers: int | None = 4
    budget: float | None = 0.4
    threshold: float = 0.5
    schedule: Schedule = field(default_factory=Schedule)
    reeval_every: int = 64
    relevance_rows: int = 8
    reeval_lag: int = 8
    thaw_relevance: float = 4.0
    entropy: EntropyRule = field(default_factory=EntropyRule)
    recover_tokens: int = 64
    recover_span: int = 8
    recover_recent: int = 256
    escalate_within: int = 4
    pin: int = 32
    obs_window: int = 32
    question: bool = True
    pool: int = 15
    heads: Combine = "max"
    page: int = 1
    evict_cells: int = 8
    reread: int = 32
    fill: bool = True
    loan: int = 16
    relevance_thaw: bool = False
    trigger: Trigger = "entropy-mass"
    trigger_every: int = 4
    trigger_mass: float = 0.2
    trigger_cover: float = 0.8
    swap_against: Literal["max", "current"] = "max"
    redecode_mass: float = 0.0
    prefetch: int = 0
    prefetch_matches: int = 16
    read_twice: bool = False
    keep_share: float = 0.25
    recall: int = 0
    recall_prompt_rows: int = 512
    recall_prompt_size: int = 512
    recall_prompt_tail: int = 2048
    recall_ratio: float = 4.0
    recall_reply: int = 0
    recall_reply_size: int = 128
    _ledger: Ledger = field(init=False, repr=False)
    _monitor: EntropyMonitor = field(init=False, repr=False)
    _bigrams: BigramIndex = field(init=False, repr=False)
    recoveries: list[Recovery] = field(init=False, repr=False)
    _judging: _Judging | None = field(init=False, repr=False, default=None)
    _check: tuple[int, int, Future[np.ndarray]] | None = field(init=False, repr=False, default=None)
    _loan: _Loan | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        if self.reeval_every < 1 or self.relevance_rows < 1 or self.window < 1 or self.pin < 0:
            raise ValueError("reeval_every, relevance_rows and window must be >= 1, pin >= 0")
        if not 0 <= self.reeval_lag < self.reeval_every:
            raise ValueError("reeval_lag must lie within 0..reeval_every - 1")
        if not 0 <= self.reread <= self.recent or self.page < 1 or self.pool < 1:
            raise ValueError("reread must lie within 0..recent; page and pool must be >= 1")
        if self.loan < 0:
            raise ValueError(f"loan must be >= 0, got {self.loan}")
        if not 0 <= self.keep_share < 1:
            raise ValueError(f"keep_share must lie within [0, 1), got {self.keep_share}")
        self._restart()

    def _restart(self) -> None:
        """Runtime state as a new policy has it."""
        self._ledger = Ledger(self.schedule)
        self._monitor = EntropyMonitor(self.entropy)
        self._bigrams = BigramIndex()
        self.recoveries = []
        self._judging = None
        self._check = None
        self._loan = None

    def recovery_log(self) -> list[dict[str, object]]:
        return [r.as_dict() for r in self.recoveries]

    def state(self) -> dict[str, Any]:
        loan = self._loan  # due at a decode of one token: a short reply's may fall due when the next turn is read
        return {"ledger": self._ledger.state(), "monitor": self._monitor.state(),
                "recoveries": [r.as_dict() for r in self.recoveries],
                "loan": None if loan is None else {"at": loan.at, "positions": loan.positions, "scores": loan.scores}}

    def load_state(self, state: dict[str, Any]) -> None:
        self._ledger.load_state(state["ledger"])
        self._monitor.load_state(state["monitor"])
        self.recoveries = [Recovery.from_dict(d) for d in state["recoveries"]]
        self._check = None
        loan = state.get("loan")  # saves before the loan have none
        self._loan = None if loan is None else _Loan(int(loan["at"]), np.asarray(loan["positions"], np.int64),
                                                     np.asarray(loan["scores"], np.float64))

    # eviction under a hard budget
    def score(self, ctx: PolicyContext, positions: np.ndarray) -> np.ndarray:
        s = ctx.importance.of(positions)
        return np.where(self._ledger.is_pinned(positions, ctx.step), np.inf, s)

    def on_evict(self, ctx: PolicyContext, positions: np.ndarray) -> None:
        self._ledger.frozen(positions, ctx.step)

    def capture_layers(self, n_layer: int) -> tuple[int, ...]:
        """Every layer unless ``layers`` says otherwise: the heads that find a fact from its question sit in
        different layers per model (measured: 35/36 needle answers with all 30 layers, 32/36 with 8)."""
        return self.layers or tuple(range(n_layer))

    @property
    def recalls(self) -> bool:
        """Whether frozen rows are lent to layers inside decodes (:mod:`asrkf_edge.recall`): short ones or prompt chunks."""
        return bool(self.recall or self.recall_prompt_rows or self.recall_reply)

    def without_recall(self) -> AsrKf:
        """This policy where recall cannot lend rows (layers on a GPU): the same, recall off."""
        return replace(self, recall=0, recall_prompt_rows=0, recall_reply=0)

    # question-time reselection
    def read_again(self, ctx: PolicyContext) -> bool:
        """With ``read_twice``, a prompt that did not fit is read a second time, and the ``keep_share`` of the
        budget its question scores highest (:meth:`question_score`, not its newest ``2 * obs_window`` tokens, the
        question itself) stays in the cache from the moment it is read: every later token, the side turns and the
        question among them, is computed with what the question needs in view, as in a whole read.

        Why: at 4k the bench's multi-turn misses were lost while the prompt was read under the budget, not at the
        question (fourth and fifth sessions: the fact was active at the first answer token; read whole and then
        cut to 0.35, the prompt answered). The price is reading the prompt twice. Only a prompt read into an empty
        session is read again (a generation, a chat's first turn): a later chat turn is read once."""
        if not (self.read_twice and self.question and ctx.n_frozen):
            return False
        score = self.question_score(ctx)
        if score is None:
            return False
        early = score[: max(0, ctx.n_logical - 2 * self.obs_window)]
        keep = np.argsort(-early, kind="stable")[: int(self.keep_share * ctx.budget)]
        self._restart()
        self._ledger.hold(np.sort(keep).astype(np.int64))  # pinned until the read ends, in every eviction and swap
        return True

    def after_prompt(self, ctx: PolicyContext) -> None:
        self._ledger.release_held()
        self._loan = None  # a new question: the last one's loan is void
        if self.question and ctx.n_frozen:
            self.reselect(ctx)

    def question_score(self, ctx: PolicyContext, rows: int | None = None, heads: Combine | None = None,
                       pool_k: int | None = None) -> np.ndarray | None:
        """Per logical token, the attention the newest ``obs_window`` query rows (the question) give it, per head,
        pooled over ``pool`` neighbours, combined over heads (frozen tokens scored from their mirrored keys);
        None before any query row was kept."""
        imp = ctx.importance
        q, qpos = imp.recent_queries(rows or self.obs_window, complete=True)
        if not len(qpos):
            return None
        kpos = np.arange(ctx.n_logical, dtype=np.int64)
        return combine(pool(imp.heads(q, qpos, kpos), pool_k or self.pool), heads or self.heads) / len(qpos)

    def reselect(self, ctx: PolicyContext, reread: int | None = None, rows: int | None = None, heads: Combine | None = None,
                 pool_k: int | None = None) -> np.ndarray:
        """Choose the active set again from every logical token, frozen ones included, by :meth:`question_score`;
        fill the budget with the best; then read the newest ``reread`` tokens again so that they and the next
        logits see what came back. Returns what came back. The decayed scores stay the reading's, and what left is
        lent to the question for ``loan`` steps (:meth:`_repay`); ``loan`` 0: the question's scores replace them."""
        score = self.question_score(ctx, rows, heads, pool_k)
        if score is None:
            return np.zeros(0, np.int64)
        imp = ctx.importance
        n = ctx.n_logical
        kpos = np.arange(n, dtype=np.int64)
        back_to = n - max(1, self.reread if reread is None else reread) - 1  # re-reading continues from it
        keep = choose(score, ctx.protected(kpos) | (kpos >= back_to), ctx.budget - ctx.budget // 16, self.page)
        act, frozen = ctx.active(), ctx.frozen()
        out, back = act[~keep[act]], frozen[keep[frozen]]
        step = ctx.step
        if len(out):
            ctx.freeze(out)
            self._ledger.frozen(out, step)
        if self.loan:
            self._loan = _Loan(step + self.loan, out, imp.of(out))
        else:
            imp.scores[:n] = score
        if len(back):
            ctx.thaw(back, redecode=False)
            self._ledger.thawed(back, step, self.pin)
            ctx.reread(max(1, self.reread if reread is None else reread))
        return back

    # rolling re-evaluation
    def after_decode(self, ctx: PolicyContext, pos0: int, n: int) -> None:
        """Every ``reeval_every`` decode steps (and after each prompt chunk): frozen tokens whose freeze ran out
        are judged where they lie, from their mirrored keys, by the attention of the newest queries. One comes
        back only into a free cell or in place of an unprotected active token it beats (the i-th best expired
        against the i-th weakest active), at most ``recover_tokens`` per round; the rest stay frozen for longer
        (count + 1). Thawing every expired token above the freeze bar instead swapped thousands of tokens a
        round at 16k-32k (65 ms of freeze and 56 ms of thaw per decoded token on an H200) for no answer gained.
        With ``relevance_thaw``, any frozen token the newest queries attend to strongly comes back too.

        When the tracker works in the background (layers on a GPU), a decode step's judgement lands ``reeval_lag``
        steps after its queries were taken (0: at the next step), its host attention computed on the worker thread
        meanwhile (23 ms a call at 32k on an H200's host, default shape, where a token took 4.8 ms)."""
        step = ctx.step
        if self._loan is not None and n == 1 and step >= self._loan.at:
            self._repay(ctx)
        if n == 1 and self.trigger in ("mass", "entropy-mass") and ctx.n_frozen and ctx.importance.background:
            self._query_mass(ctx)  # the trigger's check, ready before the entropy spikes
        if self._judging is not None and (n > 1 or step >= self._judging.at):
            self._judge(ctx)
        if (n == 1 and step % self.reeval_every) or ctx.n_logical < self.min_cache:
            return
        self._ledger.grow(ctx.n_logical)
        frozen = ctx.frozen()
        due = frozen[self._ledger.due(frozen, step)]
        cand = frozen if self.relevance_thaw else due
        if len(cand):
            act = ctx.active()
            self._judging = _Judging(self._relevance_job(ctx, act, cand), act, cand, due, step + self.reeval_lag)
            if n > 1 or not ctx.importance.background:
                self._judge(ctx)
        if self.fill:
            return  # freeze only when the budget needs the room: cells left empty buy nothing
        act = ctx.active()
        cand = act[~ctx.protected(act)]
        cand = cand[~self._ledger.is_pinned(cand, step)]
        low = cand[ctx.importance.of(cand) < self.threshold / ctx.n_logical]
        if len(low):
            ctx.freeze(low)
            self._ledger.frozen(low, step)

    def _repay(self, ctx: PolicyContext) -> None:
        """The end of a question's loan: the tokens its reselection froze come back, best decayed score first, at most
        ``recover_tokens`` (a re-evaluation round's), each into a free cell or in place of the unpinned active token
        with the lowest decayed score, only where it beats it. The question's own picks stay pinned for ``pin``
        steps, so a reply still finds its fact.

        Why: the question's 32 rows choose well for the reply's first tokens and badly for the text after them
        (context 2000, 128 tokens, 0.35, KLD of the first 32 tokens / the rest: GFDL-1.3 0.016 / 0.133 with the
        question's set kept, 0.017 / 0.085 never reselected; MPL-2.0 0.072 / 0.123 against 0.120 / 0.092). Why the
        cap: at 2k the loan repaid 120-162 of the 200-217 tokens it froze, but at 16k on a GPU (8B shape) repaying
        all it could cost 1.2 ms a token of thaw over a 256-token reply (110 against 133 tok/s); 64 gave as low a
        KLD (mean over four texts 0.061 against 0.066; 32: 0.068, 128: 0.067)."""
        loan, self._loan = self._loan, None
        assert loan is not None
        still = np.isin(loan.positions, ctx.frozen())
        order = np.argsort(-loan.scores[still], kind="stable")[: self.recover_tokens]
        back, value = loan.positions[still][order], loan.scores[still][order]
        act = ctx.active()
        self._exchange(ctx, act, ctx.importance.of(act), back, value, 0)

    def _exchange(self, ctx: PolicyContext, act: np.ndarray, held: np.ndarray, back: np.ndarray, gain: np.ndarray,
                  pin: int) -> np.ndarray:
        """Frozen ``back`` (best first, each worth ``gain``) come back, the i-th into a free cell or in place of the
        i-th weakest by ``held`` (one value per ``act``) of the active tokens that may leave (not protected, not
        pinned, not the newest), only where it beats it; the first that does not, stops the rest. What came back
        scores its ``gain``. Returns it (best first)."""
        movable = np.flatnonzero(~ctx.protected(act) & ~self._ledger.is_pinned(act, ctx.step) & (act < ctx.n_logical - 1))
        weakest = movable[np.argsort(held[movable], kind="stable")]
        free = max(0, ctx.budget - len(act) - 1)  # the token decoded next needs a cell
        k = winners(gain, held[weakest], free)
        out = act[weakest[: max(0, k - free)]]
        if len(out):
            ctx.freeze(out)
            self._ledger.frozen(out, ctx.step)
        self._thaw(ctx, back[:k], pin, redecode=False)
        ctx.importance.scores[back[:k]] = gain[:k]
        return back[:k]

    def finish(self, ctx: PolicyContext) -> None:
        if self._judging is not None:
            self._judge(ctx)

    def _judge(self, ctx: PolicyContext) -> None:
        """Apply the pending re-evaluation to the tokens it judged that are still where they were."""
        j, self._judging = self._judging, None
        assert j is not None
        rel_act, rel = self._shares(j.job.result(), len(j.act))
        act_now = ctx.active()
        still = np.isin(j.act, act_now)
        act, rel_act = j.act[still], rel_act[still]
        still = np.isin(j.cand, ctx.frozen())
        cand, rel = j.cand[still], rel[still]
        step = ctx.step
        back = np.zeros(0, np.int64)
        if self.relevance_thaw:
            hot = rel >= self.thaw_relevance
            back = self._around(cand[hot][np.argsort(-rel[hot], kind="stable")], cand, self._thaw_cap(ctx))
            self._thaw(ctx, back, self.pin)
        is_due = np.isin(cand, j.due) & ~np.isin(cand, back)
        order = np.flatnonzero(is_due)[np.argsort(-rel[is_due], kind="stable")][: self.recover_tokens]
        movable = ~ctx.protected(act) & ~self._ledger.is_pinned(act, step)
        above = int((rel[order] >= self.threshold).sum())  # a prefix: ``order`` is best first
        up = order[: min(above, winners(rel[order], np.sort(rel_act[movable]), ctx.budget - len(act_now)))]
        stay = np.ones(len(cand), bool)
        stay[up] = False
        self._ledger.frozen(cand[is_due & stay], step)
        self._thaw(ctx, cand[up], 0, redecode=False)

    # recovery during generation
    def after_logits(self, ctx: PolicyContext) -> None:
        """Bring frozen context back when the next token needs it. ``trigger``: "mass" checks, every
        ``trigger_every`` steps, how much of the current query's attention would go to frozen keys and, at
        ``trigger_mass`` or more, swaps in what it wants (:meth:`_swap_in`) and decodes the token again;
        "entropy-mass" (default) makes that check only on an entropy spike; "entropy" climbs the paper's
        ladder on a spike; "none" never recovers.

        The token is decoded again after a swap only when ``redecode_mass`` or more of its attention went to
        frozen keys. Measured with asrkf-follow's settings (context 2000, 128 tokens, mean KLD from full, two
        texts; decodes again out of 128): at budget 0.35, always 0.029 / 0.022 (128), at 10% 0.039 / 0.032
        (18 / 32), never 0.057; at 0.5, always 0.015 / 0.010, at 5% 0.017 / 0.011 (82), at 10% 0.031 / 0.025
        (0-1). asrkf without a trigger: 0.080 / 0.073 and 0.048 / 0.047. A second decode costs what the first
        does: at 10% 0.6-0.9x of full's speed on 2 CPU cores at 2k, always 0.45-0.57x (benchmarks/kld_variants.py)."""
        if not ctx.n_frozen or self.trigger == "none":
            return  # nothing to recover: the entropy is watched while something is frozen
        h: float | None = None
        threshold: float | None = None
        if self.trigger != "mass":
            h = float(entropy(ctx.logits()))
            threshold = self._monitor.threshold()
            if not self._monitor.observe(h):
                return
        elif ctx.step % self.trigger_every:
            return
        if self.trigger == "entropy":
            assert h is not None and threshold is not None
            self._climb(ctx, h, threshold)
            return
        rec = Recovery(ctx.step, ctx.n_logical, h, threshold, 0)
        swapped = self._swap_in(ctx)
        if swapped is None:
            return
        back, share = swapped
        rec.thawed, rec.ranges = len(back), runs(back)
        if len(back) and share >= self.redecode_mass:
            ctx.redecode()
            rec.entropy_after = float(entropy(ctx.logits()))
        self.recoveries.append(rec)

    def before_token(self, ctx: PolicyContext, token: int) -> None:
        """Before ``token`` is decoded: thaw the frozen tokens that followed the newest ``prefetch_matches``
        earlier occurrences of the bigram it completes (each occurrence and ``prefetch`` tokens after it,
        :mod:`.induction`). Room is made the usual way (the lowest scores leave).

        Off by default. Measured (context 2000, 128 tokens, KLD from full at budget 0.35 / 0.5): GPL 0.080 / 0.048
        without, 0.064 / 0.039 with ``prefetch=4``; GFDL 0.073 / 0.047 against 0.075 / 0.029; a text read again
        (tests) KLD below half. But a thaw and an eviction almost every token: 13% of decode speed at 2k on
        2 CPU cores, and on an H200 the default model decoded 77 against 199 tok/s at 4k (each thaw a
        synchronous upload)."""
        if not self.prefetch or not ctx.n_frozen:
            return
        n = ctx.n_logical
        self._bigrams.sync(n, ctx.tokens)
        hits = self._bigrams.matches(self._bigrams.last, token, self.prefetch_matches)
        want = continuations(hits, self.prefetch, n)
        frozen = ctx.frozen()
        want = want[frozen[np.minimum(np.searchsorted(frozen, want), len(frozen) - 1)] == want][: self._thaw_cap(ctx)]
        self._thaw(ctx, want, 0, redecode=False)

    def _swap_in(self, ctx: PolicyContext) -> tuple[np.ndarray, float] | None:
        """The current query's attention over active and frozen keys (the decayed score's layers, mirrored
        keys). Below ``trigger_mass`` on frozen keys: None. Otherwise the frozen tokens it wants most, until
        they cover ``trigger_cover`` of that mass (at most ``recover_tokens``), come back, each into a free
        cell or in place of the weakest unprotected active token, and only where it beats it; weakest by
        max(decayed score, current attention) (``swap_against="max"``: a rare fire must not undo what the
        decayed score chose) or by the current attention alone ("current", for a check on every token).
        Returns what came back (its score becomes its current attention).

        Measured (bench ppl, context 2000, 128 tokens, budget 0.35 / 0.5, mean KLD from full): no trigger
        0.080 / 0.048; this swap on every token at 3% ("current") 0.029 / 0.015; re-choosing the whole set
        for the one query instead 0.024 / 0.014 when it fired on every token but 0.043 / 0.062 at 10%, where
        it fired on a fifth: one query's ranking of the rest is noise, so a rare fire replaced a good set
        with a worse one."""
        imp = ctx.importance
        act, frozen = ctx.active(), ctx.frozen()
        cur = self._query_mass(ctx).result()[0]
        cur_act, cur_frozen = _at(cur, act), _at(cur, frozen)
        share = float(cur_frozen.sum())
        if share < self.trigger_mass:
            return None
        order = np.argsort(-cur_frozen, kind="stable")
        want = order[: min(int(np.searchsorted(np.cumsum(cur_frozen[order]), self.trigger_cover * share)) + 1,
                           self.recover_tokens)]
        value = np.maximum(imp.of(act), cur_act) if self.swap_against == "max" else cur_act
        return np.sort(self._exchange(ctx, act, value, frozen[want], cur_frozen[want], self.pin)), share

    def _climb(self, ctx: PolicyContext, h: float, threshold: float) -> None:
        """The entropy ladder: relevant frozen ranges, then the recent window, then as much as fits."""
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
        rel = self._relevance(ctx, ctx.active(), frozen)[1]
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
    def _query_mass(self, ctx: PolicyContext) -> Future[np.ndarray]:
        """The attention mass the newest kept query gives every position up to its own ([1, qpos + 1]; the
        positions after it are hidden from it), whichever of them are frozen now: the trigger's check. Computed
        once per query (and again after a decode computed positions again); with the tracker in the background
        :meth:`after_decode` queues it when the query is taken, so that a spike finds it done. Measured on an H100
        (LLaMA-3-8B shape, random ids, 4k): computed at the spike, a check cost the token 12 ms, most of it waiting
        for the fold queued before it and the host attention over every key of 8 layers (docs/gpu.md, twelfth
        session)."""
        imp = ctx.importance
        q, qpos = imp.recent_queries(1)
        key = (int(qpos[-1]), imp.generation)
        if self._check is None or self._check[:2] != key:
            self._check = (*key, imp.mass_job(q, qpos, np.arange(key[0] + 1, dtype=np.int64), imp.fold))
        return self._check[2]

    def _relevance(self, ctx: PolicyContext, act: np.ndarray, frozen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Most attention any of the newest queries would give each active and each frozen token, in uniform
        shares, normalised jointly (keys from the mirror; the decayed score's layers)."""
        return self._shares(self._relevance_job(ctx, act, frozen).result(), len(act))

    def _relevance_job(self, ctx: PolicyContext, act: np.ndarray, frozen: np.ndarray) -> Future[np.ndarray]:
        """The attention mass behind :meth:`_relevance`, computed in the background where the tracker does."""
        imp = ctx.importance
        q, qpos = imp.recent_queries(self.relevance_rows)
        return imp.mass_job(q, qpos, np.concatenate([act, frozen]), imp.fold)

    @staticmethod
    def _shares(mass: np.ndarray, n_act: int) -> tuple[np.ndarray, np.ndarray]:
        """Per key, the most any query row gives it, in uniform shares: the first ``n_act`` keys', the rest's."""
        most = mass.max(axis=0) * mass.shape[1]
        return most[:n_act], most[n_act:]

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


def _at(mass: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``mass`` (by position, up to a query's own) at ``positions``; 0 after it."""
    inside = positions < len(mass)
    return np.where(inside, mass[np.where(inside, positions, 0)], 0).astype(mass.dtype)


@dataclass
class AsrKfQ8(AsrKf):
    """asrkf over llama.cpp's q8_0 KV cache: active cells and the frozen store hold q8_0 rows, copied as they are
    (about 53% of the f16 bytes per token); the key mirror that scores them stays f16."""

    name: ClassVar[str] = "asrkf-q8_0"
    cache_type: ClassVar[int] = GGML_Q8_0


@dataclass
class AsrKfQ8Q4(AsrKf):
    """asrkf over a q8_0 K cache and a q4_0 V cache (llama.cpp's ``-ctk q8_0 -ctv q4_0``): 52/128 of the f16 bytes
    per token, 14% of full's at a third of the cells. Keys set the attention weights and take quantization worse than
    values: at 0.35 (2-core EPYC, 1k) needle / multi-turn / passkey 10 / 8 / 10 of 10 and mean KLD over three texts
    0.076, against asrkf-q4_0's 10 / 6 / 8 and 0.128 (q4_0 keys too) and asrkf-q8_0's 10 / 8 / 8 and 0.073."""

    name: ClassVar[str] = "asrkf-q8_0-q4_0"
    cache_type: ClassVar[int] = GGML_Q8_0
    cache_type_v: ClassVar[int | None] = GGML_Q4_0


@dataclass
class AsrKfQ4(AsrKf):
    """asrkf over llama.cpp's q4_0 KV cache: active cells and the frozen store hold q4_0 rows, copied as they are
    (about 28% of the f16 bytes per token); the key mirror that scores them stays f16."""

    name: ClassVar[str] = "asrkf-q4_0"
    cache_type: ClassVar[int] = GGML_Q4_0


@dataclass
class AsrKfTwice(AsrKf):
    """asrkf that reads a prompt which does not fit twice: the second read keeps what the first read's question
    chose in the cache from the moment it is read (:meth:`AsrKf.read_again`). Twice the prompt's reading time."""

    name: ClassVar[str] = "asrkf-twice"
    read_twice: bool = True


@dataclass
class AsrKfFollow(AsrKf):
    """asrkf whose active set follows every query: each decode step checks how much of the token's attention
    would go to frozen keys and, at 3% or more, swaps in what it wants and decodes the token again.

    Measured (bench ppl, context 2000, 128 tokens, 2 cores; mean KLD from full at budget 0.35 / 0.5): 0.029 /
    0.015 against asrkf's 0.080 / 0.048 and the bench's oracle's 0.023 / 0.014, firing on every token; on two
    other texts 0.011 / 0.007 and 0.022 / 0.010. The price is a second decode and a small copy in and out per
    token (docs/RESULTS.md). For when quality matters more than speed."""

    name: ClassVar[str] = "asrkf-follow"
    trigger: Trigger = "mass"
    trigger_every: int = 1
    trigger_mass: float = 0.03
    swap_against: Literal["max", "current"] = "current"  # KLD 0.029 / 0.015 against 0.041 / 0.020 with "max"
    observe_every: int = 1  # the check needs each token's own query
    pin: int = 0  # the swap keeps a token only while it beats others; pinned for 32 tokens, what came back
    # filled the cache and the KL divergence tripled (0.118 against 0.041, 1,000 tokens at 0.35)


@dataclass
class AsrKfRecall(AsrKf):
    """asrkf whose frozen tokens come back inside each decode, layer by layer: once a layer's query is computed,
    the frozen tokens it attends to most take the cells of the active ones it attends to least, in that layer only,
    for that decode (:mod:`asrkf_edge.recall`). CPU caches only.

    Measured (benchmarks/kld_variants.py, context 2000, 128 tokens, mean KLD from full over the bench's text and five
    licences, 2-core EPYC): 0.016 / 0.009 at budget 0.35 / 0.5 with 64 rows a layer, against asrkf's 0.067 / 0.035
    and streaming's 0.062 / 0.037; the cost is scoring every key of every layer (about 4 ms a token at 2k on 2
    cores), not the rows moved. ``recall`` rows a layer at 0.35, six texts: 64 / 128 / 192 gave 0.0159 / 0.0140 /
    0.0134, the callback 2.0-2.5 / 2.2-3.0 ms a token at 512 tokens (once the rows were copied by address, fifteenth
    session); 128 answered as 64 did on the 1k and 2k needle, multi-turn and passkey suites but for one multi-turn
    case at 1k (8 of 10 against 9; full 9). ``recall_prompt_rows``, ``_size``, ``_tail``: the chunks of a
    prompt's newest 2,048 tokens recall too, up to 512 tokens a layer chosen by every one of their query rows: a
    third of the divergence and the 4k multi-turn misses came from reading the prompt in the bounded cache
    (benchmarks/prefill_fidelity.py; the nineteenth session: the misses are answered when only the document's last
    ~900 tokens, the side turns and the question are read with every cell). 4k, the bench's text, 64 tokens (2-core
    Xeon): KLD 0.0272 -> 0.0078 at 0.35 (128 lent a layer: 0.0088; at 0.5 0.0115 -> 0.0058; newest 1,024 tokens:
    0.0121, 0.0059); bench needle 4k, multi-turn 3 -> 5 and 4 -> 5 of full's 6 at 0.35 and 0.5, needle 9 -> 8 (full
    7). 32 rows spread over every chunk, as the fifteenth session had it: 0.0178 and multi-turn 2k and 4k one answer
    down each. The cost is every row scoring every key: reading 4k tokens 18.7 -> 21.9 s on 2 cores (one row's
    scores over 4,000 keys cost half of what this 135M model's weights cost a token; an 8B model's, a sixteenth).
    No recovery trigger: with every layer recalling each token, the entropy-mass trigger's thaws and
    second decodes bought nothing (benchmarks/trigger_ablation.py --base asrkf-recall, 1k and 2k: the same answer
    in every case, the trigger never fired; kld_variants.py, 512 tokens: 6 recoveries in 128 tokens, KLD 0.0229
    with and without) and cost a decode each (at 512 tokens 5 in 64, 1.2 ms a token). ``recall_ratio`` 4: a
    frozen token takes a cell only for more than four times its token's attention; at 512 tokens 77 -> 46 rows a
    layer lent per token, KLD 0.0229 -> 0.0236, decode 0.98x -> 1.03x of full's speed (alternating blocks of 8
    tokens in one process); at 2k nearly every exchange gains more than that (132 -> 131 rows), KLD over four
    texts 0.0156 -> 0.0154. The prompt's chunks recall as asrkf's do (asrkf's defaults since the twenty-second
    session)."""

    name: ClassVar[str] = "asrkf-recall"
    recall: int = 128
    trigger: Trigger = "none"

    def without_recall(self) -> AsrKf:
        """asrkf as it is: recall off and asrkf's recovery trigger back (this policy has none only because recall
        brings frozen tokens back inside every decode)."""
        return replace(super().without_recall(), trigger=AsrKf.trigger)
