"""Markdown of a bench run: one table per suite, the targets asrkf is held to, the machine and command."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..policies import policy_names
from .suites import SUITES, Record


def order(policy: object) -> int:
    """Where a policy's rows go in tables and legends: the registry's order."""
    names = policy_names()
    return names.index(str(policy)) if policy in names else len(names)


def _mean(rs: Sequence[Record], key: str) -> float:
    return sum(float(r[key]) for r in rs) / len(rs)


def _groups(records: Sequence[Record], *keys: str) -> list[tuple[tuple[object, ...], list[Record]]]:
    out: dict[tuple[object, ...], list[Record]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return sorted(out.items(), key=lambda kv: tuple(order(v) if k == "policy" else v for k, v in zip(keys, kv[0], strict=True)))


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
    full = next((float(r["ppl"]) for r in records if r["policy"] == "full"), None)
    rows = []
    for r in sorted(records, key=lambda r: order(r["policy"])):
        d = f"{100 * (float(r['ppl']) / full - 1):+.2f}%" if full else "-"
        rows.append([r["policy"], f"{float(r['ppl']):.3f}", d, f"{float(r['kld_mean']):.4f}", f"{float(r['kld_max']):.3f}",
                     f"{100 * float(r['same_top']):.1f}", f"{float(r['kv_peak_pct']):.0f}", r["recoveries"]])
    return _table(["policy", "ppl", "vs full", "mean KLD", "max KLD", "same top %", "peak KV % of full", "recoveries"], rows)


def speed_table(records: Sequence[Record]) -> str:
    full = {r["length"]: float(r["decode_tokens_per_s"]) for r in records if r["policy"] == "full"}
    gpu = any(r.get("gpu_used_mb") is not None for r in records)  # layers offloaded: the GPU's memory in use too
    rows = []
    for (length, policy), rs in _groups(records, "length", "policy"):
        r = rs[0]
        ratio = f"{float(r['decode_tokens_per_s']) / full[length]:.2f}x" if length in full else "-"
        rows.append([length, policy, f"{float(r['prefill_tokens_per_s']):.0f}", f"{float(r['decode_tokens_per_s']):.1f}", ratio,
                     f"{float(r['kv_peak_pct']):.0f}", f"{float(r['rss_mb']):.0f}",
                     *([f"{float(r['gpu_used_mb']):.0f}"] if gpu else []), f"{float(r['observe_ms_per_token']):.2f}",
                     f"{float(r['freeze_ms_per_token']):.2f}", f"{float(r['thaw_ms_per_token']):.2f}",
                     f"{float(r['policy_ms_per_token']):.2f}", r["decode_recoveries"]])
    return _table(["context", "policy", "prefill tok/s", "decode tok/s", "vs full", "peak KV % of full", "RSS MB",
                   *(["GPU MB in use"] if gpu else []), "scoring ms/tok", "freeze ms/tok", "thaw ms/tok",
                   "policy ms/tok (all)", "recoveries"], rows)


def targets(records: Sequence[Record]) -> str:
    """Issue 5's targets for asrkf against full, each with the measured figure and whether it was met."""
    rows = []
    by = lambda suite, policy: [r for r in records if r["suite"] == suite and r["policy"] == policy]  # noqa: E731
    for suite in ("passkey", "needle"):
        a, f = by(suite, "asrkf"), by(suite, "full")
        a, f = [r for r in a if int(r["target_length"]) <= 4000], [r for r in f if int(r["target_length"]) <= 4000]
        if a and f:
            sa, sf = _mean(a, "score"), _mean(f, "score")
            rows.append([f"{suite} accuracy at 1k-4k = full's", f"asrkf {sa:.2f} vs full {sf:.2f}, peak KV "
                         f"{max(float(r['kv_peak_pct']) for r in a):.0f}% of full", "yes" if sa >= sf else "no"])
    a, f = by("ppl", "asrkf"), by("ppl", "full")
    if a and f:
        d = float(a[0]["ppl"]) / float(f[0]["ppl"]) - 1
        rows.append(["perplexity within 2% of full", f"{100 * d:+.2f}%", "yes" if d <= 0.02 else "no"])
        k, t = float(a[0]["kld_mean"]), float(a[0]["same_top"])
        rows.append(["mean KLD <= 0.005, same top >= 98%", f"{k:.4f}, {100 * t:.1f}%", "yes" if k <= 0.005 and t >= 0.98 else "no"])
    a, f = by("speed", "asrkf"), {r["length"]: r for r in by("speed", "full")}
    for r in a:
        if r["length"] in f:
            ratio = float(r["decode_tokens_per_s"]) / float(f[r["length"]]["decode_tokens_per_s"])
            if int(r["length"]) >= 4000:
                rows.append([f"decode at {r['length']} faster than full", f"{ratio:.2f}x", "yes" if ratio > 1 else "no"])
            elif int(r["length"]) <= 512:
                rows.append([f"overhead at {r['length']} under 10%", f"{100 * (1 - ratio):.1f}%", "yes" if ratio > 0.9 else "no"])
    return _table(["target", "measured", "met"], rows) if rows else ""


def report(info: dict[str, Any], records: Sequence[Record], plots: Sequence[str] = ()) -> str:
    """Markdown for a whole run: machine, settings, the targets, one table per suite, the plots."""
    m, model = info["machine"], info["model"]
    parts = ["# asrkf-edge benchmark results", "Every policy ran in one process on the same prompts; figures are "
             "from one run of the command below (raw data: the --json file).",
             f"Model {model['name']} ({model['path']}), {m['cpu']} ({m['cores']} cores, {m['system']}), "
             f"{'all layers on ' + str(m['gpu']) + ', ' if m.get('gpu') else ''}"
             f"llama-cpp-python {m['llama_cpp_python']}, asrkf-edge {m['asrkf_edge']}, flash attention "
             f"{'on' if info['flash_attn'] else 'off'}, budget {info['budget']} of the prompt for the bounded policies, "
             f"peak RSS {float(info['peak_rss_mb']):.0f} MB, {float(info['wall_seconds']) / 60:.0f} minutes.",
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
