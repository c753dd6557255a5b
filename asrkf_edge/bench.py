"""Benchmarks: every policy on the same prompts in one process, side by side, with the machine named.

A suite yields one record (a flat dict of raw figures) per run; :func:`report` turns records into
Markdown tables. ``asrkf-edge bench SUITE`` drives it with a progress bar, ``--json FILE`` and ``--plots DIR``.
Questions always come after their document, so no policy sees them while deciding what to freeze or drop.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import __version__, kvcopy
from .engine import Engine
from .policy import make_policy
from .runner import Runner, budget_cells
from .tasks import Case, cwe, haystack_text, needle, needle_multiturn, passkey

KEYS = (68231, 40917, 75302, 19486, 53720, 86154, 27309, 61847)
POLICY_ORDER = ("full", "asrkf", "streaming", "h2o", "q8_0", "q4_0", "shift")
Record = dict[str, object]


def machine(gpu: bool = False) -> dict[str, object]:
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
            "gpu": ", ".join(kvcopy.gpu_names()) if gpu else None}


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

    policies: Sequence[str] = POLICY_ORDER
    budget: float = 0.35
    lengths: Sequence[int] = (1000, 2000, 4000, 8000)  # passkey prompts, tokens
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    keys: int = 1  # passkey keys (needle facts) per length x depth; every cell gets a different one
    needle_lengths: Sequence[int] = (1000, 2000, 4000, 8000)
    cwe_lengths: Sequence[int] = (500, 1000)
    ppl_context: int = 4000  # tokens read before scoring
    ppl_tokens: int = 256  # tokens scored (teacher-forced, one decode each)
    speed_lengths: Sequence[int] = (512, 1000, 2000, 4000, 8000)
    speed_tokens: int = 64

    def size(self, suite: str) -> int:
        """Runs a suite makes (for the progress bar)."""
        cells = len(self.depths) * self.keys
        n = {"passkey": len(self.lengths) * cells, "needle": 2 * len(self.needle_lengths) * cells + len(self.cwe_lengths) * self.keys,
             "ppl": 1,
             "speed": len(self.speed_lengths)}[suite]
        return n * len(self.policies)


# one generation ----------------------------------------------------------------------------------


def kv_figures(stats: dict[str, object], full_bytes_per_token: int) -> Record:
    """Active KV in tokens, bytes and % of what the full f16 cache holds at the end of the run."""
    logical = int(stats["logical_tokens"])  # type: ignore[call-overload]
    bpt = int(stats["kv_bytes_per_token"])  # type: ignore[call-overload]
    peak, mean = int(stats["active_tokens_peak"]), float(stats["active_tokens_mean"])  # type: ignore[call-overload,arg-type]
    whole = logical * full_bytes_per_token
    return {"kv_peak_bytes": peak * bpt, "kv_mean_bytes": mean * bpt,
            "kv_peak_pct": 100 * peak * bpt / whole if whole else 0.0, "kv_mean_pct": 100 * mean * bpt / whole if whole else 0.0}


def _answer(engine: Engine, suite: str, task: str, case: Case, policy: str, plan: Plan, max_tokens: int,
            **fields: object) -> Record:
    t0 = time.perf_counter()
    r = engine.generate(case.prompt, max_tokens, policy=policy, budget=plan.budget, chat=False)
    st = {k: v for k, v in r.stats.items() if k != "recovery_log"}
    return {"suite": suite, "task": task, "policy": policy, "length": case.n_tokens, "depth": case.depth,
            "score": case.score(r.text), "correct": case.correct(r.text), "answer": r.text, "expected": case.answer,
            "wall_seconds": time.perf_counter() - t0, **fields, **st, **kv_figures(r.stats, engine.info.kv_bytes_per_token)}


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
                for policy in plan.policies:
                    yield _answer(engine, "passkey", "passkey", case, policy, plan, 8, target_length=length, key=key)


def needle_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """A fact in natural prose asked in chat form, right after the document and two unrelated turns later;
    then common-word extraction (aggregation, where keeping a top-k of tokens is known to fail)."""
    for li, length in enumerate(plan.needle_lengths):
        for di, depth in enumerate(plan.depths):
            for k in range(plan.keys):
                index = li * len(plan.depths) * plan.keys + di * plan.keys + k
                for task, build in (("needle", needle), ("multiturn", needle_multiturn)):
                    case = build(engine, length, depth, index)
                    for policy in plan.policies:
                        yield _answer(engine, "needle", task, case, policy, plan, 24, target_length=length, index=index)
    for length in plan.cwe_lengths:
        for k in range(plan.keys):
            case = cwe(engine, length, k)
            for policy in plan.policies:
                yield _answer(engine, "needle", "cwe", case, policy, plan, 32, target_length=length, index=k)


def _text_tokens(engine: Engine, n: int) -> list[int]:
    """``n`` tokens of the shipped prose (repeated when longer than it)."""
    base = engine.tokenize(haystack_text(), add_bos=False)
    bos = [engine.model.bos] if engine.model.add_bos else []
    return (bos + base * (1 + n // len(base)))[:n]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def ppl_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """Perplexity and KL divergence from ``full`` (llama.cpp's --kl-divergence convention, KL(full || policy))
    over ``ppl_tokens`` of prose read one token at a time after ``ppl_context`` tokens, at equal budget.
    Also traces active KV against tokens read (the growth picture)."""
    tokens = _text_tokens(engine, plan.ppl_context + plan.ppl_tokens)
    ctx, tail = tokens[: plan.ppl_context], tokens[plan.ppl_context :]
    ref: list[np.ndarray] = []
    order = ["full"] + [p for p in plan.policies if p != "full"]  # full first: the reference
    for policy in order:
        pol = make_policy(policy)
        t0 = time.perf_counter()
        with engine.runner(pol, budget_cells(pol, plan.budget, len(ctx), len(tail))) as run:
            trace: list[tuple[int, int]] = []
            for i in range(0, len(ctx), 256):
                run.prefill(ctx[i : i + 256])
                trace.append((run.session.n_logical, int(run.session.kv_stats()["active_tokens"])))
            nll, kld, top = [], [], []
            for j, tok in enumerate(tail):
                lp = _log_softmax(run.logits())
                nll.append(-lp[tok])
                if policy == "full":
                    ref.append(lp)
                else:
                    p = np.exp(ref[j])
                    kld.append(float((p * (ref[j] - lp)).sum()))
                    top.append(int(np.argmax(lp) == np.argmax(ref[j])))
                run.decode(tok)
                if j % 16 == 15:
                    trace.append((run.session.n_logical, int(run.session.kv_stats()["active_tokens"])))
            st = run.stats()
        if policy not in plan.policies:
            continue
        st.pop("recovery_log")
        yield {"suite": "ppl", "policy": policy, "length": len(ctx), "scored_tokens": len(tail),
               "ppl": float(np.exp(np.mean(nll))), "kld_mean": float(np.mean(kld)) if kld else 0.0,
               "kld_max": float(np.max(kld)) if kld else 0.0, "same_top": float(np.mean(top)) if top else 1.0,
               "wall_seconds": time.perf_counter() - t0, "trace": trace,
               **st, **kv_figures(st, engine.info.kv_bytes_per_token)}


def _decode_greedy(run: Runner, n: int) -> float:
    """Seconds to decode ``n`` greedy tokens."""
    t0 = time.perf_counter()
    for _ in range(n):
        run.decode(int(np.argmax(run.logits())))
    return time.perf_counter() - t0


def speed_suite(engine: Engine, plan: Plan) -> Iterator[Record]:
    """Prefill and decode tokens/s, resident memory and the per-token cost of scoring, freezing and thawing."""
    for length in plan.speed_lengths:
        tokens = _text_tokens(engine, length)
        for policy in plan.policies:
            pol = make_policy(policy)
            rss0 = rss_mb()
            with engine.runner(pol, budget_cells(pol, plan.budget, length, plan.speed_tokens)) as run:
                t0 = time.perf_counter()
                run.prefill(tokens)
                prefill = time.perf_counter() - t0
                before = run.stats()
                decode = _decode_greedy(run, plan.speed_tokens)
                st = run.stats()
                rss = rss_mb()
                gpu = kvcopy.gpu_memory_used() / 1e6 if engine.model.n_gpu_layers else None  # this run's context held
            st.pop("recovery_log")
            n = plan.speed_tokens

            def per_token(key: str, st: Record = st, before: Record = before, n: int = n) -> float:
                return 1000 * (float(st[key]) - float(before[key])) / n  # type: ignore[arg-type]

            yield {"suite": "speed", "policy": policy, "length": length, "prefill_tokens_per_s": length / prefill,
                   "decode_tokens_per_s": n / decode, "rss_mb": rss, "rss_delta_mb": rss - rss0,
                   "observe_ms_per_token": per_token("observe_seconds"), "freeze_ms_per_token": per_token("freeze_seconds"),
                   "thaw_ms_per_token": per_token("thaw_seconds"), "policy_ms_per_token": per_token("policy_seconds"),
                   "decode_recoveries": int(st["recoveries"]) - int(before["recoveries"]),  # type: ignore[call-overload]
                   "gpu_used_mb": gpu,
                   **st, **kv_figures(st, engine.info.kv_bytes_per_token)}


SUITES: dict[str, Callable[[Engine, Plan], Iterator[Record]]] = {
    "passkey": passkey_suite, "needle": needle_suite, "ppl": ppl_suite, "speed": speed_suite}


# tables ------------------------------------------------------------------------------------------


def _order(policy: object) -> int:
    return POLICY_ORDER.index(str(policy)) if policy in POLICY_ORDER else len(POLICY_ORDER)


def _mean(rs: Sequence[Record], key: str) -> float:
    return sum(float(r[key]) for r in rs) / len(rs)  # type: ignore[arg-type]


def _groups(records: Sequence[Record], *keys: str) -> list[tuple[tuple[object, ...], list[Record]]]:
    out: dict[tuple[object, ...], list[Record]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return sorted(out.items(), key=lambda kv: tuple(_order(v) if k == "policy" else v for k, v in zip(keys, kv[0], strict=True)))  # type: ignore[misc]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(records: Sequence[Record]) -> str:
    """Per task, prompt length and policy: accuracy (mean score), active KV, frozen bytes, recoveries."""
    rows = []
    for (task, length, policy), rs in _groups(records, "task", "target_length", "policy"):
        rows.append([task, length, policy, f"{sum(bool(r['correct']) for r in rs)}/{len(rs)}", f"{_mean(rs, 'score'):.2f}",
                     f"{_mean(rs, 'kv_peak_pct'):.0f}", f"{_mean(rs, 'kv_mean_pct'):.0f}",
                     f"{_mean(rs, 'store_bytes') / 1e6:.1f}", f"{_mean(rs, 'recoveries'):.1f}"])
    return _table(["task", "length", "policy", "correct", "score", "peak KV % of full", "mean KV %", "frozen MB",
                   "recoveries"], rows)


def ppl_table(records: Sequence[Record]) -> str:
    full = next((float(r["ppl"]) for r in records if r["policy"] == "full"), None)  # type: ignore[arg-type]
    rows = []
    for r in sorted(records, key=lambda r: _order(r["policy"])):
        d = f"{100 * (float(r['ppl']) / full - 1):+.2f}%" if full else "-"  # type: ignore[arg-type]
        rows.append([r["policy"], f"{float(r['ppl']):.3f}", d, f"{float(r['kld_mean']):.4f}", f"{float(r['kld_max']):.3f}",  # type: ignore[arg-type]
                     f"{100 * float(r['same_top']):.1f}", f"{float(r['kv_peak_pct']):.0f}", r["recoveries"]])  # type: ignore[arg-type]
    return _table(["policy", "ppl", "vs full", "mean KLD", "max KLD", "same top %", "peak KV % of full", "recoveries"], rows)


def speed_table(records: Sequence[Record]) -> str:
    full = {r["length"]: float(r["decode_tokens_per_s"]) for r in records if r["policy"] == "full"}  # type: ignore[arg-type]
    gpu = any(r.get("gpu_used_mb") is not None for r in records)  # layers offloaded: the GPU's memory in use too
    rows = []
    for (length, policy), rs in _groups(records, "length", "policy"):
        r = rs[0]
        ratio = f"{float(r['decode_tokens_per_s']) / full[length]:.2f}x" if length in full else "-"  # type: ignore[arg-type]
        rows.append([length, policy, f"{float(r['prefill_tokens_per_s']):.0f}", f"{float(r['decode_tokens_per_s']):.1f}", ratio,  # type: ignore[arg-type]
                     f"{float(r['kv_peak_pct']):.0f}", f"{float(r['rss_mb']):.0f}",  # type: ignore[arg-type]
                     *([f"{float(r['gpu_used_mb']):.0f}"] if gpu else []), f"{float(r['observe_ms_per_token']):.2f}",  # type: ignore[arg-type]
                     f"{float(r['freeze_ms_per_token']):.2f}", f"{float(r['thaw_ms_per_token']):.2f}",  # type: ignore[arg-type]
                     f"{float(r['policy_ms_per_token']):.2f}", r["decode_recoveries"]])  # type: ignore[arg-type]
    return _table(["context", "policy", "prefill tok/s", "decode tok/s", "vs full", "peak KV % of full", "RSS MB",
                   *(["GPU MB in use"] if gpu else []), "scoring ms/tok", "freeze ms/tok", "thaw ms/tok",
                   "policy ms/tok (all)", "recoveries"], rows)


def targets(records: Sequence[Record]) -> str:
    """Issue 5's targets for asrkf against full, each with the measured figure and whether it was met."""
    rows = []
    by = lambda suite, policy: [r for r in records if r["suite"] == suite and r["policy"] == policy]  # noqa: E731
    for suite in ("passkey", "needle"):
        a, f = by(suite, "asrkf"), by(suite, "full")
        a, f = [r for r in a if int(r["target_length"]) <= 4000], [r for r in f if int(r["target_length"]) <= 4000]  # type: ignore[call-overload]
        if a and f:
            sa, sf = _mean(a, "score"), _mean(f, "score")
            rows.append([f"{suite} accuracy at 1k-4k = full's", f"asrkf {sa:.2f} vs full {sf:.2f}, peak KV "
                         f"{max(float(r['kv_peak_pct']) for r in a):.0f}% of full", "yes" if sa >= sf else "no"])  # type: ignore[arg-type]
    a, f = by("ppl", "asrkf"), by("ppl", "full")
    if a and f:
        d = float(a[0]["ppl"]) / float(f[0]["ppl"]) - 1  # type: ignore[arg-type]
        rows.append(["perplexity within 2% of full", f"{100 * d:+.2f}%", "yes" if d <= 0.02 else "no"])
        k, t = float(a[0]["kld_mean"]), float(a[0]["same_top"])  # type: ignore[arg-type]
        rows.append(["mean KLD <= 0.005, same top >= 98%", f"{k:.4f}, {100 * t:.1f}%", "yes" if k <= 0.005 and t >= 0.98 else "no"])
    a, f = by("speed", "asrkf"), {r["length"]: r for r in by("speed", "full")}
    for r in a:
        if r["length"] in f:
            ratio = float(r["decode_tokens_per_s"]) / float(f[r["length"]]["decode_tokens_per_s"])  # type: ignore[arg-type]
            if int(r["length"]) >= 4000:  # type: ignore[call-overload]
                rows.append([f"decode at {r['length']} faster than full", f"{ratio:.2f}x", "yes" if ratio > 1 else "no"])
            elif int(r["length"]) <= 512:  # type: ignore[call-overload]
                rows.append([f"overhead at {r['length']} under 10%", f"{100 * (1 - ratio):.1f}%", "yes" if ratio > 0.9 else "no"])
    return _table(["target", "measured", "met"], rows) if rows else ""


def report(info: dict[str, object], records: Sequence[Record], plots: Sequence[str] = ()) -> str:
    """Markdown for a whole run: machine, settings, the targets, one table per suite, the plots."""
    m, model = info["machine"], info["model"]
    parts = ["# asrkf-edge benchmark results", "Every policy ran in one process on the same prompts; figures are "
             "from one run of the command below (raw data: the --json file).",
             f"Model {model['name']} ({model['path']}), {m['cpu']} ({m['cores']} cores, {m['system']}), "  # type: ignore[index]
             f"{'all layers on ' + str(m['gpu']) + ', ' if m.get('gpu') else ''}"  # type: ignore[attr-defined]
             f"llama-cpp-python {m['llama_cpp_python']}, asrkf-edge {m['asrkf_edge']}, flash attention "  # type: ignore[index]
             f"{'on' if info['flash_attn'] else 'off'}, budget {info['budget']} of the prompt for the bounded policies, "
             f"peak RSS {float(info['peak_rss_mb']):.0f} MB, {float(info['wall_seconds']) / 60:.0f} minutes.",  # type: ignore[arg-type]
             f"Command: `{info['command']}`"]
    if t := targets(records):
        parts += ["### Targets (asrkf against full)", t]
    titles = {"passkey": "Passkey retrieval", "needle": "Needle in prose, multi-turn needle, common words (chat form)",
              "ppl": "Perplexity and KL divergence from full", "speed": "Speed and memory"}
    tables = {"passkey": accuracy_table, "needle": accuracy_table, "ppl": ppl_table, "speed": speed_table}
    for suite in SUITES:
        rs = [r for r in records if r["suite"] == suite]
        if rs:
            parts += [f"### {titles[suite]}", tables[suite](rs)]
    parts += [f"![{p}]({p})" for p in plots]
    return "\n\n".join(parts) + "\n"
