"""GPU speed, memory and freeze/thaw cost, all layers offloaded (n_gpu_layers=-1), flash attention on.

Usage: python benchmarks/gpu_speed.py MODEL.gguf [--label NAME] [--lengths 4096 16384 32768] [--decode 64]
       [--budget 0.35] [--span 1024] [--repeat 7] [--runs 3] [--json out.json] [--skip-speed] [--skip-copy]

Import order matters on a CUDA build: this script imports llama_cpp before NumPy (see NOTES).

Speed: for each logical length L, ``full`` (a cache of L + decode cells) and ``asrkf`` at ``--budget`` of the
prompt each read an L-token prompt, then decode ``--decode`` tokens greedily. Reported: decode tokens/s, prefill
tokens/s, GPU memory in use (the device's total minus free, as the CUDA backend reports it) after the model load
and at the end of decoding, and the KV cache's own size (cells x bytes per token). ``--runs`` rounds over every
(length, policy), interleaved; the summary gives each decode rate's median and range (asrkf moved 15-27% between
single runs on one H200).

Copy: a 4,096-cell session holds 3,000 tokens; a ``--span``-token range is frozen to the host store and thawed
back ``--repeat`` times, with the staging off (``ASRKF_EDGE_STAGING=0``: a fresh pageable array per copy, as
before) and on (one reused pinned buffer), interleaved on the same context sizes. Reported per token and in
GB/s: the device-to-host state copy alone (``llama_state_seq_get_data``), the whole freeze (copy, parse, store
write with its hash), the host-to-device load alone (``llama_state_seq_set_data``) and the whole thaw.
"""

# ruff: noqa: I001, E402
from __future__ import annotations

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted loading a model otherwise)

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from asrkf_edge import Engine, llama
from asrkf_edge.llama import SCRATCH_SEQ
from asrkf_edge.policies import make_policy
from asrkf_edge.runner import budget_cells

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpl-3.0.txt"


def prompt(engine: Engine, n: int, seed: int = 0) -> list[int]:
    """Real text for a model with a real vocabulary, else random ids (the 8B-shaped random model)."""
    if engine.model.n_vocab > 100_000 and engine.info.name.startswith("random"):
        rng = np.random.default_rng(seed)
        return [int(t) for t in rng.integers(300, engine.model.n_vocab, n)]
    text = TEXT.read_text()
    toks: list[int] = []
    while len(toks) < n:
        toks += engine.tokenize(text, add_bos=not toks)
    return toks[:n]


def speed(engine: Engine, policy: str, n: int, n_decode: int, budget: float, base_used: int) -> dict[str, object]:
    toks = prompt(engine, n)
    pol = make_policy(policy)
    cells = budget_cells(pol, budget if pol.bounded else None, n, n_decode)
    with engine.runner(policy, cells) as run:
        t0 = time.perf_counter()
        run.prefill(toks)
        t1 = time.perf_counter()
        used_prefill = llama.gpu_memory_used()
        tok = int(np.argmax(run.logits()))
        before = run.stats().as_dict()
        t2 = time.perf_counter()
        for _ in range(n_decode):
            run.decode(tok)
            tok = int(np.argmax(run.logits()))
        t3 = time.perf_counter()
        used = llama.gpu_memory_used()
        st = run.stats().as_dict()
        ctx_cells = run.session.ctx.n_ctx
        bpt = run.session.bytes_per_token
    return {
        "policy": policy, "logical_tokens": n + n_decode, "cells": ctx_cells,
        "prefill_tokens_per_s": n / (t1 - t0), "decode_tokens_per_s": n_decode / (t3 - t2),
        "gpu_used_gib": max(used, used_prefill) / 2**30, "gpu_used_model_only_gib": base_used / 2**30,
        "gpu_above_model_gib": (max(used, used_prefill) - base_used) / 2**30,
        "kv_cache_gib": ctx_cells * bpt / 2**30,
        "active_peak": st["active_tokens_peak"], "frozen_tokens": st["frozen_tokens"],
        "host_store_gib": st["frozen_kv_bytes"] / 2**30, "freeze_events": st["freeze_events"],
        "thaw_events": st["thaw_events"], "recoveries": st["recoveries"], "policy_seconds": st["policy_seconds"],
        "observe_seconds": st["observe_seconds"], "freeze_seconds": st["freeze_seconds"], "thaw_seconds": st["thaw_seconds"],
        **{f"decode_{k}_ms_per_token": 1e3 * (float(st[f"{k}_seconds"]) - float(before[f"{k}_seconds"])) / n_decode
           for k in ("policy", "observe", "freeze", "thaw")},
    }


def copy_cost(engine: Engine, span: int, repeat: int) -> dict[str, object]:
    toks = prompt(engine, 3000, seed=1)
    out: dict[str, dict[str, list[float]]] = {}
    sessions = {}
    for mode in ("0", "1"):  # before (no staging), after (pinned staging)
        os.environ["ASRKF_EDGE_STAGING"] = mode
        s = engine.session(4096)
        s.eval(toks)
        sessions[mode] = s
        out[mode] = {k: [] for k in ("d2h", "freeze", "h2d", "thaw")}
    os.environ.pop("ASRKF_EDGE_STAGING", None)
    nbytes = 0
    try:
        for i in range(repeat + 1):  # the first round warms up (JIT, allocations) and is dropped
            for mode, s in sessions.items():
                p0 = 100 + (i * 131) % (3000 - span - 200)
                ctx = s.ctx
                # device -> host alone
                ctx.seq_cp(0, SCRATCH_SEQ, p0, p0 + span)
                t0 = time.perf_counter()
                raw = ctx.state_get(SCRATCH_SEQ)
                t1 = time.perf_counter()
                nbytes = raw.nbytes
                blob = raw.copy()  # pageable, as the session's thaw blob is
                del raw
                ctx.seq_rm(SCRATCH_SEQ, -1, -1)
                # host -> device alone (into the scratch sequence, then dropped)
                t2 = time.perf_counter()
                ctx.state_set(blob, SCRATCH_SEQ)
                t3 = time.perf_counter()
                ctx.seq_rm(SCRATCH_SEQ, -1, -1)
                # the session's whole freeze and thaw
                t4 = time.perf_counter()
                assert s.freeze(p0, p0 + span) == span
                t5 = time.perf_counter()
                assert s.thaw(p0, p0 + span) == span
                t6 = time.perf_counter()
                if i:
                    for k, v in (("d2h", t1 - t0), ("h2d", t3 - t2), ("freeze", t5 - t4), ("thaw", t6 - t5)):
                        out[mode][k].append(v)
        bpt = sessions["1"].bytes_per_token
    finally:
        for s in sessions.values():
            s.close()
    res: dict[str, object] = {"span_tokens": span, "blob_bytes": nbytes, "kv_bytes_per_token": bpt,
                              "pinned": llama.pinned_available()}
    for mode, name in (("0", "before"), ("1", "after")):
        r = {}
        for k, v in out[mode].items():
            med = statistics.median(v)
            r[f"{k}_us_per_token"] = med / span * 1e6
            r[f"{k}_gb_per_s"] = span * bpt / med / 1e9
            r[f"{k}_runs_ms"] = [round(x * 1e3, 3) for x in v]
        res[name] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--label", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--span", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-copy", action="store_true")
    ap.add_argument("--policies", nargs="+", default=["full", "asrkf"])
    ap.add_argument("--allow-cpu", action="store_true", help="smoke-test the script without a GPU")
    a = ap.parse_args()
    if not llama.gpu_devices() and not a.allow_cpu:
        raise SystemExit("llama.cpp has no GPU backend here")
    t = time.perf_counter()
    with Engine.load(a.model, n_gpu_layers=-1, flash_attn=True) as eng:
        load_s = time.perf_counter() - t
        base = llama.gpu_memory_used()
        res: dict[str, object] = {
            "model": a.label or eng.info.name, "path": a.model,
            "device": ", ".join(llama.gpu_names()) or "cpu",
            "host": platform.node(), "n_layer": eng.model.n_layer, "n_head": eng.model.n_head, "n_head_kv": eng.model.n_head_kv,
            "head_dim": eng.model.head_dim, "load_seconds": load_s, "flash_attn": True, "budget": a.budget, "decode_tokens": a.decode,
            "speed": [], "copy": None,
        }

        def dump() -> None:
            if a.json:
                Path(a.json).write_text(json.dumps(res, indent=1))

        if not a.skip_copy:
            res["copy"] = c = copy_cost(eng, a.span, a.repeat)
            dump()
            for name in ("before", "after"):
                r = c[name]
                print(f"copy {name:6s}: " + "  ".join(f"{k} {r[f'{k}_us_per_token']:.2f} us/tok {r[f'{k}_gb_per_s']:.2f} GB/s"
                                                    for k in ("d2h", "freeze", "h2d", "thaw")), flush=True)
        if not a.skip_speed:
            for pol in a.policies:  # not recorded: Numba compiles its kernels on a machine's first run
                speed(eng, pol, 2048, 4, a.budget, base)
            for run in range(a.runs):
                for n in a.lengths:
                    for pol in a.policies:
                        r = {"run": run, **speed(eng, pol, n, a.decode, a.budget, base)}
                        res["speed"].append(r)  # type: ignore[union-attr]
                        dump()
                        print(f"{n:6d} {pol:6s} decode {r['decode_tokens_per_s']:7.1f} tok/s prefill {r['prefill_tokens_per_s']:.0f} tok/s "
                              f"GPU {r['gpu_used_gib']:.2f} GiB (+{r['gpu_above_model_gib']:.2f})  KV {r['kv_cache_gib']:.2f} GiB  "
                              f"frozen {r['frozen_tokens']}  policy {r['policy_seconds']:.2f} s (scoring {r['observe_seconds']:.2f}, "
                              f"freeze {r['freeze_seconds']:.2f}, thaw {r['thaw_seconds']:.2f}; decode policy "
                              f"{r['decode_policy_ms_per_token']:.2f} ms/tok)", flush=True)
            res["summary"] = summary(res["speed"])  # type: ignore[arg-type]
            for row in res["summary"]:  # type: ignore[union-attr]
                print(f"{row['length']:6d} {row['policy']:6s} decode median {row['decode_median']:7.1f} tok/s "
                      f"(range {row['decode_min']:.1f}-{row['decode_max']:.1f}, {row['runs']} runs)", flush=True)
    dump()


def summary(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Median and range of the decode rate per (length, policy) over the runs."""
    groups: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        groups.setdefault((int(r["logical_tokens"]), str(r["policy"])), []).append(float(r["decode_tokens_per_s"]))  # type: ignore[arg-type]
    return [{"length": n, "policy": p, "runs": len(v), "decode_median": statistics.median(v), "decode_min": min(v),
             "decode_max": max(v)} for (n, p), v in groups.items()]


if __name__ == "__main__":
    main()
