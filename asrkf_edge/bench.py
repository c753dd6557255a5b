"""Benchmarks: every policy on the same prompts in one process, side by side, with the machine named.

A suite yields one record (a flat dict of raw figures) per run; :func:`summarize` turns records into a
Markdown table. ``asrkf-edge bench SUITE`` drives it with a progress bar and ``--json FILE``.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import llama_cpp

from . import __version__
from .engine import Engine
from .tasks import passkey

KEYS = (68231, 40917, 75302, 19486, 53720, 86154, 27309, 61847)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__, "asrkf_edge": __version__}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


@dataclass(frozen=True)
class PasskeyPlan:
    lengths: Sequence[int] = (1000, 2000, 4000)
    depths: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)
    keys_per_cell: int = 1
    policies: Sequence[str] = ("full", "asrkf", "streaming", "h2o")
    budget: float | None = 0.35
    max_tokens: int = 8

    def size(self) -> int:
        return len(self.lengths) * len(self.depths) * self.keys_per_cell * len(self.policies)


def passkey_suite(engine: Engine, plan: PasskeyPlan) -> Iterator[dict[str, object]]:
    """Passkey retrieval: each length x depth x key, every policy on the identical prompt."""
    tok = lambda text: engine.tokenize(text, add_bos=engine.model.add_bos)  # noqa: E731
    for length in plan.lengths:
        for depth in plan.depths:
            for k in range(plan.keys_per_cell):
                key = KEYS[(k + int(depth * 100) + length) % len(KEYS)]
                case = passkey(tok, length, depth, key)
                for policy in plan.policies:
                    t0 = time.perf_counter()
                    r = engine.generate(case.prompt, plan.max_tokens, policy=policy, budget=plan.budget, chat=False)
                    st = r.stats
                    yield {
                        "suite": "passkey", "policy": policy, "length": length, "depth": depth, "key": key,
                        "correct": case.correct(r.text), "answer": r.text, "wall_seconds": time.perf_counter() - t0,
                        "active_fraction_peak": int(st["active_tokens_peak"]) / int(st["prompt_tokens"]),  # type: ignore[call-overload]
                        **{k: v for k, v in st.items() if k != "recovery_log"},
                    }


SUITES: dict[str, Callable[..., Iterator[dict[str, object]]]] = {"passkey": passkey_suite}


def summarize(records: Sequence[dict[str, object]]) -> str:
    """Markdown table per policy and prompt length: accuracy, active KV, speed, recoveries."""
    groups: dict[tuple[str, int], list[dict[str, object]]] = {}
    for r in records:
        groups.setdefault((str(r["policy"]), int(r["length"])), []).append(r)  # type: ignore[call-overload]
    lines = ["| policy | length | accuracy | peak active KV (% of prompt) | mean active KV (%) | frozen MB on disk "
             "| prefill tok/s | decode tok/s | recoveries |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {p: i for i, p in enumerate(("full", "asrkf", "streaming", "h2o"))}
    for (policy, length), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        def mean(key: str, rs: list[dict[str, object]] = rs) -> float:
            return sum(float(r[key]) for r in rs) / len(rs)  # type: ignore[arg-type]

        acc = sum(bool(r["correct"]) for r in rs)
        mean_active = sum(float(r["active_tokens_mean"]) / float(r["prompt_tokens"]) for r in rs) / len(rs)  # type: ignore[arg-type]
        lines.append(f"| {policy} | {length} | {acc}/{len(rs)} | {100 * mean('active_fraction_peak'):.0f} | "
                     f"{100 * mean_active:.0f} | {mean('store_bytes') / 1e6:.1f} | {mean('prefill_tokens_per_s'):.0f} | "
                     f"{mean('decode_tokens_per_s'):.1f} | {mean('recoveries'):.1f} |")
    return "\n".join(lines)
