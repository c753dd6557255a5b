"""Where a decoded token's time goes, per policy variant: llama.cpp's decode, the policy, its scoring, key
read-backs (peeks), thaws, freezes, and the wait for the logits.

Usage: python benchmarks/gpu_breakdown.py MODEL.gguf --lengths 4096 16384 --runs 3 \\
           --variants '[["full", "full", {}], ["asrkf", "asrkf", {}], ["inline", "asrkf", {"_background": false}]]'

Each variant is [label, policy, field overrides] (a dict for a dataclass field: {"entropy": {"rise": 0}}); the
overrides ``_background`` and ``_split`` set the tracker's
background fold and split capture (both on by default when the layers are on a GPU), ``_fold_threads`` the Numba
threads of the background fold (by default all but one), ``_switch_interval`` the interpreter's switch interval
(seconds; ``sys.setswitchinterval``) while the variant runs, ``_prefault`` (false) the store's faulting-in of arena
pages ahead of the freezes, ``_overlap`` (false) a token's decode beside the policy's hooks (``Session.overlap``;
"decode" then times the launch, "wait" the wait for it), ``_thread`` (false) every decode on the calling thread
instead of the decode thread, ``_spin_ns`` how long the decode thread and its waiter spin before they sleep,
``_rows_beside`` (false) a gather of earlier tokens' rows beside the decode in flight (``Context.wait_rows``),
``_queue`` (false) the cells' removals, copies and renumberings made beside it queued (``Context._later``). Prompts are random token ids,
the same for every variant of one run and length (seeded by both), so variants compare paired. Every layer goes to
the GPU when there is one (``--allow-cpu`` runs it on the CPU); flash attention is on unless ``--no-flash-attn``
(then the decayed score folds llama.cpp's own softmax instead of attention computed on the host). Prints a line
per run and a median (range) per length and variant; ``--json`` writes the rows. ``--hooks`` adds, per run, the
host milliseconds a decoded token spends in each of the policy path's main calls (inclusive: nested calls count in
both) and how often each ran. ``--timeline`` adds, for a context that decodes on its thread (asrkf's on CUDA), where
the GPU waited for the host: the gaps from each decode's end to the next launch, classed by what ran in them.
``--allow-cpu --gpu-mode`` runs it all on the CPU as with the layers on a CUDA GPU (benchmarks/gpu_mode_on_cpu.py).
With ``full``, llama.cpp's decode
returns before the GPU finishes and the wait shows up in ``logits``; a policy that captures attention waits inside
the decode.
"""

# ruff: noqa: I001, E402
from __future__ import annotations

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted loading a model otherwise)

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np

from asrkf_edge import Engine, capture, cells, gather, importance, llama, pages, runner, session, store
from asrkf_edge.policies import asrkf, make_policy
from asrkf_edge.runner import budget_cells
from gpu_mode_on_cpu import gpu_mode

_TIMED = ("decode", "wait", "logits", "peek")
_HOOKS = [(importance.Importance, "observe"),
          (importance.Importance, "mass"), (importance.Importance, "mass_job"), (importance.Importance, "_wait"),
          (importance.Importance, "ensure_keys"), (asrkf.AsrKf, "after_decode"), (asrkf.AsrKf, "after_logits"),
          (asrkf.AsrKf, "_swap_in"), (asrkf.AsrKf, "_judge"), (asrkf.AsrKf, "_relevance_job"),
          (session.Session, "_freeze_positions"), (session.Session, "_restore"), (session.Session, "make_room"),
          (session.Session, "cell_positions"), (asrkf.EntropyMonitor, "observe"),
          (importance._Held, "result"),  # this thread waiting for a background job (a landing's host attention)
          # inside a freeze and a thaw: the device gather, the store's write and read, the mirror's fill, the upload
          (gather.RowGather, "gather"), (store.FrozenStore, "put"), (store.FrozenStore, "read"),
          (store.Arena, "hashes"), (importance.Importance, "on_keys"), (llama.Context, "state_set"),
          (llama.Context, "synchronize"), (session.Session, "_rm_at"), (session.Session, "_land"),
          # the token's whole host path around them: a decoded token is Runner.decode (Session.feed inside it), then
          # the logits read and the sampler's argmax outside it
          (runner.Runner, "decode"), (runner.Runner, "_settle"), (session.Session, "feed"), (importance.Importance, "flush"),
          (capture.Capture, "reset"), (capture.Capture, "check"), (cells.CellMap, "decode")]


def hook_timers(spent: dict[str, list[float]]) -> list[tuple[type, str, Any]]:
    """Time every call of the methods in ``_HOOKS`` into ``spent[name] = [seconds, calls]``; returns what
    :func:`restore` puts back. The module-level ``entropy`` the policy calls is timed too."""
    saved: list[tuple[Any, str, Any]] = []

    def timed(owner: Any, attr: str) -> None:
        fn, key = getattr(owner, attr), f"{getattr(owner, '__name__', 'asrkf')}.{attr}"
        saved.append((owner, attr, fn))

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc = spent.setdefault(key, [0.0, 0])
                acc[0] += time.perf_counter() - t
                acc[1] += 1
        setattr(owner, attr, wrapper)

    for owner, attr in _HOOKS:
        timed(owner, attr)
    timed(asrkf, "entropy")
    return saved


_EVENTS = [("thaw", session.Session, "_restore"), ("freeze", session.Session, "_freeze_positions"),
           ("swap", asrkf.AsrKf, "_swap_in")]
_ORDER = ("thaw", "freeze", "swap", "observed", "plain")  # a gap with several is counted under the first


def event_timers(events: list[tuple[str, int, int]]) -> list[tuple[type, str, Any]]:
    """Record (name, start, end) in ``time.monotonic_ns`` of every call of ``_EVENTS``' methods; returns what
    :func:`restore` puts back."""
    saved: list[tuple[Any, str, Any]] = []
    for name, owner, attr in _EVENTS:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def wrapper(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            t = time.monotonic_ns()
            try:
                return _fn(*a, **k)
            finally:
                events.append((_name, t, time.monotonic_ns()))
        setattr(owner, attr, wrapper)
    return saved


def timeline(decodes: list[tuple[int, int, int, int, bool]], events: list[tuple[str, int, int]],
             n_decode: int) -> dict[str, Any]:
    """Where the GPU waited for the host: per decode (launch, wait called, start, end on the decode thread, whether
    it captured), the gap from its end to the next launch, classed by the events that ran in it (``_ORDER``), in ms a
    decoded token; and the decodes' own time, the thread's start latency and the hooks running past a decode."""
    ms = 1e-6 / n_decode
    out: dict[str, Any] = {"busy": sum(e - s for _, _, s, e, _ in decodes) * ms,
                           "start": sum(s - lt for lt, _, s, _, _ in decodes) * ms,
                           "overrun": sum(max(0, w - e) for _, w, _, e, _ in decodes) * ms}
    gaps: dict[str, list[int]] = {k: [] for k in _ORDER}
    for (_, _, _, end, observed), (nxt, _, _, _, _) in zip(decodes, decodes[1:], strict=False):
        names = {name for name, a, b in events if a < nxt and b > end}
        kind = next((k for k in _ORDER[:3] if k in names), "observed" if observed else "plain")
        gaps[kind].append(nxt - end)
    for k, g in gaps.items():
        out[f"idle_{k}"] = sum(g) * ms
        out[f"n_{k}"] = len(g)
        out[f"med_{k}"] = float(np.median(g)) * 1e-6 if g else 0.0
    out["idle"] = sum(out[f"idle_{k}"] for k in _ORDER)
    return out


def restore(saved: list[tuple[Any, str, Any]]) -> None:
    for owner, attr, fn in reversed(saved):
        setattr(owner, attr, fn)


def run_variant(eng: Engine, policy: str, over: dict[str, Any], n: int, n_decode: int, budget: float, seed: int,
                hooks: bool = False, profile: str | None = None, lines: bool = False) -> dict[str, Any]:
    """Prefill ``n`` random ids, decode ``n_decode`` greedy tokens; per-token milliseconds of each part (and of
    each hook, with ``hooks``). ``profile``: a file that gets cProfile's view of the prompt's read (top functions
    by own and by cumulative time). ``lines``: the :func:`timeline` of a context that decodes on its thread."""
    over = dict(over)
    background, split = over.pop("_background", None), over.pop("_split", None)
    overlap = over.pop("_overlap", None)
    wait_rows, later = llama.Context.wait_rows, llama.Context._later
    if not over.pop("_rows_beside", True):  # every gather waits for the decode in flight, as before
        llama.Context.wait_rows = lambda self, below: self.synchronize()
    if not over.pop("_queue", True):  # every removal, copy and renumbering waits for it, as before
        llama.Context._later = lambda self, call: (self.wait(), call())[-1]
    spin, threaded = llama.DECODE_SPIN_NS, over.pop("_thread", True)
    llama.DECODE_SPIN_NS = int(over.pop("_spin_ns", spin))
    make_context = llama.Context.__init__
    if not threaded:  # every decode on this thread, as before the decode thread
        llama.Context.__init__ = lambda self, *a, **k: make_context(self, *a, **{**k, "threaded": False})
    threads = over.pop("_fold_threads", None)
    switch = over.pop("_switch_interval", None)
    interval, prefault = sys.getswitchinterval(), pages.populate_ok
    pages.populate_ok = prefault and over.pop("_prefault", True)
    if switch is not None:
        sys.setswitchinterval(float(switch))
    kept = importance._worker().submit(numba.get_num_threads).result()
    if threads is not None:
        importance._worker().submit(numba.set_num_threads, int(threads)).result()
    toks = [int(t) for t in np.random.default_rng(seed * 100_003 + n).integers(300, eng.model.n_vocab, n)]
    pol = make_policy(policy, **over)
    with eng.runner(pol, budget_cells(pol, budget if pol.bounded else None, n, n_decode)) as run:
        sess = run.session
        if background is not None:
            run.importance.background = background
        if split is not None:
            run.importance.split = split
        if overlap is not None:
            run.session.overlap = overlap
        prof = cProfile.Profile() if profile else None
        t_prompt = time.perf_counter()
        if prof is not None:
            prof.enable()
        run.prefill(toks)
        prompt_s = time.perf_counter() - t_prompt
        sess = run.session  # a policy that reads its prompt again has a new one
        if overlap is not None:
            sess.overlap = overlap
        if prof is not None:
            prof.disable()
            with open(str(profile), "a") as f:
                f.write(f"{policy} {over} length {n} seed {seed}: prompt read {prompt_s:.2f} s\n")
                st = pstats.Stats(prof, stream=f)
                st.sort_stats("tottime").print_stats(30)
                st.sort_stats("cumulative").print_stats(50)
        spent = dict.fromkeys(_TIMED, 0.0)
        count = {"decode": 0, "peek": 0}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] += time.perf_counter() - t
                    if name in count:
                        count[name] += 1
            return wrapper

        sess.ctx.logits = timed("logits", sess.ctx.logits)
        decodes: list[tuple[int, int, int, int, bool]] = []
        events: list[tuple[str, int, int]] = []
        if sess.ctx.threaded and lines:
            launch, wait, ctx = sess.ctx.launch, sess.ctx.wait, sess.ctx

            def launched(*a: Any, **k: Any) -> Any:
                decodes.append((time.monotonic_ns(), 0, 0, 0, bool(sess.capture and sess.capture.enabled)))
                return launch(*a, **k)

            def waited(*a: Any, **k: Any) -> Any:
                t, flying = time.monotonic_ns(), ctx._inflight
                try:
                    return wait(*a, **k)
                finally:
                    span = ctx.decode_span()
                    if flying and span is not None:
                        decodes[-1] = (decodes[-1][0], t, *span, decodes[-1][4])
            sess.ctx.launch, sess.ctx.wait = launched, waited
        if sess.ctx.threaded:  # its decode is a launch and a wait
            sess.ctx.launch, sess.ctx.wait = timed("decode", sess.ctx.launch), timed("wait", sess.ctx.wait)
        else:
            sess.ctx.decode = timed("decode", sess.ctx.decode)
        if pol.reversible or pol.attention is not None:
            run.importance.fetch = timed("peek", run.importance.fetch)
        before = run.stats().as_dict()
        tok = int(np.argmax(run.logits()))
        per_hook: dict[str, list[float]] = {}
        saved = hook_timers(per_hook) if hooks else []
        saved += event_timers(events) if lines and sess.ctx.threaded else []
        decodes.clear()
        t0 = time.perf_counter()
        try:
            for _ in range(n_decode):
                run.decode(tok)
                tok = int(np.argmax(run.logits()))
        finally:
            wall = time.perf_counter() - t0
            restore(saved)
        after = run.stats().as_dict()
    importance._worker().submit(numba.set_num_threads, kept).result()
    llama.Context.__init__, llama.DECODE_SPIN_NS = make_context, spin
    llama.Context.wait_rows, llama.Context._later = wait_rows, later
    sys.setswitchinterval(interval)
    pages.populate_ok = prefault
    ms = 1e3 / n_decode
    extra = {"hooks": {k: [v[0] * ms, int(v[1])] for k, v in sorted(per_hook.items(), key=lambda kv: -kv[1][0])}} if hooks else {}
    if len(decodes) > 1:
        extra["timeline"] = timeline(decodes, events, n_decode)
    return {"tok_s": n_decode / wall, "ms_tok": wall * ms, "prompt_s": prompt_s,
            **{f"{k}_ms_tok": (float(after[f"{k}_seconds"]) - float(before[f"{k}_seconds"])) * ms
               for k in ("policy", "observe", "freeze", "thaw")},
            **{f"{k}_ms_tok": spent[k] * ms for k in _TIMED},
            "decodes_per_tok": count["decode"] / n_decode, "peeks": count["peek"],
            "recoveries": float(after["recoveries"]) - float(before["recoveries"]), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--variants", default='[["full", "full", {}], ["asrkf", "asrkf", {}]]')
    ap.add_argument("--json", default=None)
    ap.add_argument("--allow-cpu", action="store_true")
    ap.add_argument("--no-flash-attn", action="store_true", help="flash attention off: scoring folds llama.cpp's own softmax")
    ap.add_argument("--hooks", action="store_true", help="host ms a token in each main call of the policy path")
    ap.add_argument("--gpu-mode", action="store_true",
                    help="with --allow-cpu: run as with the layers on a CUDA GPU (gpu_mode_on_cpu.py), the decode beside the hooks too")
    ap.add_argument("--timeline", action="store_true",
                    help="where the GPU waits for the host between decodes on the decode thread (asrkf's)")
    ap.add_argument("--profile-prompt", default=None, metavar="FILE",
                    help="cProfile every bounded policy's prompt read into FILE (appended)")
    a = ap.parse_args()
    if a.gpu_mode:
        gpu_mode()
        runner.cuda_graphs = lambda: True  # the runner turns the decode beside the hooks on where this says CUDA
    if not llama.gpu_devices() and not a.allow_cpu:
        raise SystemExit("llama.cpp has no GPU backend here (--allow-cpu to run on the CPU)")
    variants = json.loads(a.variants)
    rows: list[dict[str, Any]] = []
    with Engine.load(a.model, n_gpu_layers=-1, flash_attn=not a.no_flash_attn) as eng:
        for _, policy, over in variants:  # not recorded: Numba compiles its kernels on a machine's first run
            run_variant(eng, policy, over, 2048, 4, a.budget, seed=a.runs)
        for run in range(a.runs):
            for n in a.lengths:
                for label, policy, over in variants:
                    r = {"label": label, "length": n, "run": run,
                         **run_variant(eng, policy, over, n, a.decode, a.budget, run, a.hooks,
                                       a.profile_prompt if policy != "full" else None, a.timeline)}
                    rows.append(r)
                    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                   if k not in ("hooks", "timeline")), flush=True)
                    if "timeline" in r:
                        print("    timeline ms/tok: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in r["timeline"].items()), flush=True)
                    for k, (v, calls) in r.get("hooks", {}).items():
                        print(f"    {k:34s} {v:7.3f} ms/tok  {calls:5d} calls", flush=True)
                    if a.json:
                        Path(a.json).write_text(json.dumps(rows, indent=1))
    for n in a.lengths:
        for label, _, _ in variants:
            rs = [r for r in rows if r["length"] == n and r["label"] == label]
            med = {k: float(np.median([r[k] for r in rs])) for k in rs[0] if isinstance(rs[0][k], float)}
            rate = [r["tok_s"] for r in rs]
            print(f"{n:6d} {label:14s} {med['tok_s']:7.1f} tok/s ({min(rate):.1f}-{max(rate):.1f}) {med['ms_tok']:.2f} ms/tok: "
                  f"decode {med['decode_ms_tok']:.2f} (x{med['decodes_per_tok']:.2f}), wait {med['wait_ms_tok']:.2f}, "
                  f"logits {med['logits_ms_tok']:.2f}, "
                  f"policy {med['policy_ms_tok']:.2f} (scoring {med['observe_ms_tok']:.2f}, peek {med['peek_ms_tok']:.2f}, "
                  f"thaw {med['thaw_ms_tok']:.2f}, freeze {med['freeze_ms_tok']:.2f}); prompt read {med['prompt_s']:.2f} s",
                  flush=True)


if __name__ == "__main__":
    main()
