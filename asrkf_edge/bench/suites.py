"""Benchmark suites: every policy on the same prompts in one process, side by side, with the machine named.

A suite yields one record (a flat dict of raw figures) per run; :func:`~asrkf_edge.bench.report.report` turns
records into Markdown tables. ``asrkf-edge bench SUITE`` drives it with a progress bar, ``--json FILE`` and ``--plots DIR``.
Questions always come after their document, so no policy sees them while deciding what to freeze or drop.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from .. import llama
from ..engine import Engine
from ..generate import Sampling, generate_step
from ..llama import Sampler
from ..policies import Policy, make_policy, policy_names
from ..runner import Runner, budget_cells
from ..session import KvStats
from ..version import __version__
from .tasks import Case, cwe, haystack_text, needle, needle_multiturn, passkey

KEYS = (68231, 40917, 75302, 19486, 53720, 86154, 27309, 61847)
Record = dict[str, Any]


def machine(gpu: bool = False) -> dict[str, Any]:
    """What the figures were measured on (``gpu``: the model's layers are offloaded; name the GPUs)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__, "asrkf_edge": __version__,
            "gpu": ", ".join(llama.gpu_names()) if gpu else None}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


def rss_mb() -> float:
    """Resident memory of this process now (MB); the peak where /proc is missing (macOS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return peak_rss_mb()


@dataclass(frozen=True)
class Plan:
    """What a bench run covers. Defaults follow issue 5; a 2-core laptop needs hours for all of them."""

    policies: Sequence[str] = field(default_factory=policy_names)
    budgets: Sequence[float] = (0.35,)  # the bounded policies run at each; the others hold everything once
    lengths: Sequence[int] = (1000, 2000, 4000, 8000)  # passkey prompts, tokens
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    keys: int = 1  # passkey keys (needle facts) per length x depth; every cell gets a different one
    needle_lengths: Sequence[int] = (1000, 2000, 4000, 8000)
    cwe_lengths: Sequence[int] = (500, 1000)
    ppl_context: int = 4000  # tokens read before scoring
    ppl_tokens: int = 256  # tokens scored (teacher-forced, one decode each)
    speed_lengths: Sequence[int] = (512, 1000, 2000, 4000, 8000)
    speed_tokens: int = 64
    speed_runs: int = 1  # rounds of every policy, interleaved; each figure the median round's

    def runs(self) -> list[tuple[str, float | None]]:
        """(policy, budget) pairs each case runs under: every budget for a bounded policy, None for the others.
        speed uses the first budget only."""
        return [(p, b) for p in self.policies for b in (self.budgets if make_policy(p).bounded else (None,))]

    def size(self, suite: str) -> int:
        """Runs a suite makes (for the progress bar)."""
        cells = len(self.depths) * self.keys
        n = {"passkey": len(self.lengths) * cells, "needle": 2 * len(self.needle_lengths) * cells + len(self.cwe_lengths) * self.keys,
             "ppl": 1,
             "speed": len(self.speed_lengths)}[suite]
        return n * (len(self.policies) if suite == "speed" else len(self.runs()))


# one generation ----------------------------------------------------------------------------------


def kv_figures(stats: KvStats, full_bytes_per_token: int) -> Record:
    """Active KV in tokens, bytes and % of what the full f16 cache holds at the end of the run."""
    bpt, peak, mean = stats.kv_bytes_per_token, stats.active_tokens_peak, stats.active_tokens_mean
    whole = stats.logical_tokens * full_bytes_per_token
    return {"kv_peak_bytes": peak * bpt, "kv_mean_bytes": mean * bpt,
            "kv_peak_pct": 100 * peak * bpt / whole if whole else 0.0, "kv_mean_pct": 100 * mean * bpt / whole if whole else 0.0}


def _answers(engine: Engine, suite: str, task: str, case: Case, plan: Plan, max_tokens: int, **fields: object) -> Iterator[Record]:
    """Every (policy, budget) of the plan on one case."""
    for policy, budget in plan.runs():
        yield _answer(engine, suite, task, case, policy, budget, max_tokens, **fields)


def _answer(engine: Engine, suite: str, task: str, case: Case, policy: str, budget: float | None, max_tokens: int,
            **fields: object) -> Record:
    t0 = time.perf_counter()
    r = engine.generate(case.prompt, max_tokens, policy=policy, budget=budget, chat=False)
    return {"suite": suite, "task": task, "policy": policy, "budget": budget, "length": case.n_tokens, "depth": case.depth,
            "score": case.score(r.text), "correct": case.correct(r.text), "answer": r.text, "expected": case.answer,
            "wall_seconds": time.perf_counter() - t0, **fields, **r.stats.as_dict(log=False),
            **kv_figures(r.stats.kv, engine.info.kv_bytes_per_token)}


def _tokenizer(engine: Engine) -> Callable[[str], list[int]]:
    return lambda text: engine.tokenize(text, add_bos=engine.model.add_bos)


# suites ------------------------------------------------------------------------------------------


def passkey_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """Passkey retrieval: each length x depth x key, every policy on the identical prompt."""
    tok = _tokenizer(engine)
    for li, length in enumerate(plan.lengths):
        for di, depth in enumerate(plan.depths):
            for k in range(plan.keys):
                key = KEYS[(li * len(plan.depths) * plan.keys + di * plan.keys + k) % len(KEYS)]
                case = passkey(tok, length, depth, key)
                yield from _answers(engine, "passkey", "passkey", case, plan, 8, target_length=length, key=key)


def needle_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """A fact in natural prose asked in chat form, right after the document and two unrelated turns later;
    then common-word extraction (aggregation, where keeping a top-k of tokens is known to fail)."""
    for li, length in enumerate(plan.needle_lengths):
        for di, depth in enumerate(plan.depths):
            for k in range(plan.keys):
                index = li * len(plan.depths) * plan.keys + di * plan.keys + k
                for task, build in (("needle", needle), ("multiturn", needle_multiturn)):
                    case = build(engine, length, depth, index)
                    yield from _answers(engine, "needle", task, case, plan, 24, target_length=length, index=index)
    for length in plan.cwe_lengths:
        for k in range(plan.keys):
            case = cwe(engine, length, k)
            yield from _answers(engine, "needle", "cwe", case, plan, 32, target_length=length, index=k)


def _text_tokens(engine: Engine, n: int) -> list[int]:
    """``n`` tokens of the shipped prose (repeated when longer than it)."""
    base = engine.tokenize(haystack_text(), add_bos=False)
    bos = [engine.model.bos] if engine.model.add_bos else []
    return (bos + base * (1 + n // len(base)))[:n]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def kl_divergence(ref: np.ndarray, logprobs: np.ndarray) -> float:
    """KL(reference || policy) of one next-token distribution, from both log-probabilities."""
    return float((np.exp(ref) * (ref - logprobs)).sum())


@dataclass
class Forced:
    """One policy's reading of a prompt, then of a forced continuation: the next-token log-probabilities before each
    forced token, what the run cost, and the active KV traced against tokens read (the growth picture)."""

    logprobs: list[np.ndarray]
    stats: KvStats
    seconds: float  # reading the continuation
    thaws: int  # thaw events while reading the continuation
    decoded_again: int  # continuation tokens decoded a second time after a recovery
    trace: list[tuple[int, int]]

    def klds(self, ref: Forced) -> np.ndarray:
        """KL(ref || self) at each token of the continuation."""
        return np.array([kl_divergence(r, lp) for r, lp in zip(ref.logprobs, self.logprobs, strict=True)])

    def kld(self, ref: Forced) -> float:
        """Mean KL(ref || self) over the continuation."""
        return float(np.mean(self.klds(ref)))


def forced_decode(engine: Engine, pol: Policy, budget: float | None, ctx: Sequence[int], tail: Sequence[int]) -> Forced:
    """Read ``ctx`` as a prompt in 256-token chunks, then each token of ``tail`` in turn whatever the policy would
    have predicted (teacher forcing): the loop under ``bench ppl`` and every KL divergence of the project."""
    with engine.runner(pol, budget_cells(pol, budget if pol.bounded else None, len(ctx), len(tail))) as run:
        trace: list[tuple[int, int]] = []
        for i in range(0, len(ctx), 256):
            run.prefill(ctx[i : i + 256], final=i + 256 >= len(ctx), rest=max(0, len(ctx) - i - 256))
            trace.append((run.session.n_logical, run.session.kv_stats().active_tokens))
        thaws = run.session.thaw_events
        logprobs = []
        t0 = time.perf_counter()
        for j, tok in enumerate(tail):
            logprobs.append(_log_softmax(run.logits()))
            run.decode(tok)
            if j % 16 == 15:
                trace.append((run.session.n_logical, run.session.kv_stats().active_tokens))
        seconds = time.perf_counter() - t0
        again = sum(1 for r in getattr(run.policy, "recoveries", []) if r.entropy_after is not None)
        return Forced(logprobs, run.stats(), seconds, run.session.thaw_events - thaws, again, trace)


def ppl_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """Perplexity and KL divergence from ``full`` (llama.cpp's --kl-divergence convention, KL(full || policy))
    over ``ppl_tokens`` of prose read one token at a time after ``ppl_context`` tokens (one prompt), at equal
    budget. Also traces active KV against tokens read (the growth picture)."""
    tokens = _text_tokens(engine, plan.ppl_context + plan.ppl_tokens)
    ctx, tail = tokens[: plan.ppl_context], tokens[plan.ppl_context :]
    ref: Forced | None = None
    runs = plan.runs()
    for policy, budget in [("full", None), *(r for r in runs if r[0] != "full")]:  # full first: the reference
        t0 = time.perf_counter()
        f = forced_decode(engine, make_policy(policy), budget, ctx, tail)
        ref = ref or f
        if (policy, budget) not in runs:
            continue
        nll = [-lp[tok] for lp, tok in zip(f.logprobs, tail, strict=True)]
        top = [int(np.argmax(lp) == np.argmax(r)) for lp, r in zip(f.logprobs, ref.logprobs, strict=True)]
        kld = [kl_divergence(r, lp) for r, lp in zip(ref.logprobs, f.logprobs, strict=True)]
        yield {"suite": "ppl", "policy": policy, "budget": budget, "length": len(ctx), "scored_tokens": len(tail),
               "ppl": float(np.exp(np.mean(nll))), "kld_mean": float(np.mean(kld)), "kld_max": float(np.max(kld)),
               "same_top": float(np.mean(top)), "wall_seconds": time.perf_counter() - t0, "trace": f.trace,
               **f.stats.as_dict(log=False), **kv_figures(f.stats, engine.info.kv_bytes_per_token)}


def _decode_greedy(run: Runner, n: int) -> float:
    """Seconds to decode ``n`` greedy tokens (end of generation ignored: this measures speed)."""
    sampler = Sampler(Sampling().temperature)
    t0 = time.perf_counter()
    try:
        for _ in generate_step(run, sampler, n + 1):
            pass
    finally:
        sampler.close()
    return time.perf_counter() - t0


def speed_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """Prefill and decode tokens/s, resident memory and the per-token cost of scoring, freezing and thawing. With
    ``speed_runs`` > 1 every policy runs once per round, rounds one after another (a machine whose speed drifts
    weighs on every policy alike), and a record holds its median round by decode speed, every round's decode
    tokens/s in ``decode_runs``: on a shared 2-core machine one run of 128 tokens at 512 moved by 0.79-0.95x of
    full's from run to run."""
    for length in plan.speed_lengths:
        tokens = _text_tokens(engine, length)
        rounds: dict[str, list[Record]] = {policy: [] for policy in plan.policies}
        for _ in range(plan.speed_runs):
            for policy in plan.policies:
                rounds[policy].append(_speed_run(engine, plan, policy, length, tokens))
        for runs in rounds.values():
            ranked = sorted(runs, key=lambda r: float(r["decode_tokens_per_s"]))
            yield {**ranked[(len(ranked) - 1) // 2], "decode_runs": [r["decode_tokens_per_s"] for r in runs]}


def _speed_run(engine: Engine, plan: Plan, policy: str, length: int, tokens: list[int]) -> Record:
    """One policy's prefill of ``tokens`` and greedy decode of ``plan.speed_tokens``."""
    pol = make_policy(policy)
    rss0 = rss_mb()
    with engine.runner(pol, budget_cells(pol, plan.budgets[0], length, plan.speed_tokens)) as run:
        t0 = time.perf_counter()
        run.prefill(tokens)
        prefill = time.perf_counter() - t0
        before = run.stats()
        decode = _decode_greedy(run, plan.speed_tokens)
        st = run.stats()
        rss = rss_mb()
        gpu = llama.gpu_memory_used() / 1e6 if engine.model.n_gpu_layers else None  # this run's context held
    n = plan.speed_tokens

    def per_token(key: str) -> float:
        return 1000 * (getattr(st, key) - getattr(before, key)) / n

    return {"suite": "speed", "policy": policy, "budget": plan.budgets[0] if pol.bounded else None, "length": length,
            "prefill_tokens_per_s": length / prefill,
            "decode_tokens_per_s": n / decode, "rss_mb": rss, "rss_delta_mb": rss - rss0,
            "observe_ms_per_token": per_token("observe_seconds"), "freeze_ms_per_token": per_token("freeze_seconds"),
            "thaw_ms_per_token": per_token("thaw_seconds"), "policy_ms_per_token": per_token("policy_seconds"),
            "decode_recoveries": st.recoveries - before.recoveries,
            "gpu_used_mb": gpu,
            **st.as_dict(log=False), **kv_figures(st, engine.info.kv_bytes_per_token)}


SUITES: dict[str, Callable[[Engine, Plan], Iterator[Record]]] = {
    "passkey": passkey_suite, "needle": needle_suite, "ppl": ppl_suite, "speed": speed_suite}
