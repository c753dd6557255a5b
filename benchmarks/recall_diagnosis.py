"""Why a policy misses an answer that the full cache gives: selection, budget or query rows (issue 14).

For every case of the bench's needle, multi-turn and passkey tasks that ``full`` answers and the policy
misses, at the first answer token (the prompt read under the budget):
- which share of the fact's tokens, and of the answer's own tokens inside the fact, are active;
- where the answer's tokens rank among all tokens under two scores of the mirrored keys: the newest 8
  query rows (what asrkf's relevance thaw used) and every captured query row of the prompt's tail (the
  question);
- whether forcing the fact's span +-32 tokens active (an oracle thaw: room made by freezing the
  policy's lowest-scored tokens), then re-decoding the newest token, makes the model answer;
- whether the policy answers when the prompt is read with the whole cache and only then cut to the budget by
  its question-time reselection (``whole_read``): a miss this fixes was lost while the prompt was read under
  the budget (the KV of the tokens read then saw only part of what came before), not at the question.

    python benchmarks/recall_diagnosis.py --policy asrkf --budget 0.35 --lengths 1000,2000,4000 --out docs/recall_diagnosis.json

Prints a Markdown table (one row per miss and a summary per task and length).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from asrkf_edge import Engine
from asrkf_edge.bench.suites import KEYS, machine
from asrkf_edge.bench.tasks import NEEDLES, Case, needle, needle_multiturn, passkey
from asrkf_edge.generate import Sampling, generate_step
from asrkf_edge.llama import Sampler
from asrkf_edge.policies import make_policy
from asrkf_edge.runner import Runner, budget_cells

SPAN = 32


def cases(engine: Engine, lengths: list[int], depths: list[float], keys: int):
    """The bench's cases (same seeds and order as ``bench passkey``/``needle``), with the fact's text."""
    tok = lambda text: engine.tokenize(text, add_bos=engine.model.add_bos)  # noqa: E731
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for k in range(keys):
                key = KEYS[(li * len(depths) * keys + di * keys + k) % len(KEYS)]
                c = passkey(tok, length, depth, key)
                yield "passkey", length, c, f"The pass key is {key}. Remember it. {key} is the pass key."
                index = li * len(depths) * keys + di * keys + k
                fact = NEEDLES[index % len(NEEDLES)].fact
                for task, build in (("needle", needle), ("multiturn", needle_multiturn)):
                    yield task, length, build(engine, length, depth, index), fact


def spans(engine: Engine, tokens: list[int], prompt: str, fact: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of the fact and of the answer inside it (by byte offsets of the token pieces)."""
    data = prompt.encode()
    ends = np.cumsum([len(engine.model.piece(t, special=True)) for t in tokens])
    starts = ends - np.array([len(engine.model.piece(t, special=True)) for t in tokens])
    f0 = data.index(fact.encode())
    a0 = f0 + fact.encode().index(answer.encode())
    over = lambda a, b: np.flatnonzero((starts < b) & (ends > a))  # noqa: E731
    return over(f0, f0 + len(fact.encode())), over(a0, a0 + len(answer.encode()))


def answer(run: Runner, engine: Engine, n: int) -> str:
    sampler = Sampler(Sampling().temperature)
    try:
        toks = list(generate_step(run, sampler, n, engine.model.is_eog))
    finally:
        sampler.close()
    return engine.detokenize(toks)


def ranks(run: Runner, targets: np.ndarray) -> tuple[int, int]:
    """Best rank (1 = first) of ``targets`` among all logical tokens under the newest 8 query rows (most any
    row gives, asrkf's old relevance) and the newest 32 (their sum: the question window)."""
    imp = run.importance
    n = run.n_logical
    kpos = np.arange(n, dtype=np.int64)
    out = []
    for rows, how in ((8, "max"), (32, "sum")):
        if hasattr(imp, "recent_queries"):
            q, qpos = imp.recent_queries(rows)
        else:  # code before question-time reselection: the last decode's captured rows (the prompt's tail)
            q = imp.queries()[:, -rows:]
            qpos = np.arange(n - q.shape[1], n, dtype=np.int64)
        mass = imp.mass(q, qpos, kpos)
        score = mass.max(axis=0) if how == "max" else mass.sum(axis=0)
        order = np.argsort(-score, kind="stable")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(1, n + 1)
        out.append(int(rank[targets].min()))
    return out[0], out[1]


def run_case(engine: Engine, policy: str, budget: float, case: Case, fact: str, max_new: int, oracle: bool,
             reread: int = 0, settings: dict | None = None, whole_read: bool = False) -> dict:
    tokens = engine.tokenize(case.prompt, add_bos=engine.model.add_bos)
    fact_pos, ans_pos = spans(engine, tokens, case.prompt, fact, case.answer)
    pol = make_policy(policy, **(settings or {}))
    cells = budget_cells(pol, budget, len(tokens), max_new)
    with engine.runner(pol, len(tokens) + max_new if whole_read else cells) as run:
        if whole_read:  # read with every token active, then cut to the budget as the question would
            run.prefill(tokens, final=False)
            run.session.budget = cells
            pol.reselect(run)
            run.redecode()
        else:
            run.prefill(tokens)
        active = run.active()
        rec = {"fact_active": float(np.isin(fact_pos, active).mean()), "answer_active": float(np.isin(ans_pos, active).mean()),
               "active": len(active), "cells": cells}
        rec["rank_newest8"], rec["rank_window"] = ranks(run, ans_pos)
        if oracle:
            want = np.arange(max(0, fact_pos.min() - SPAN), min(len(tokens), fact_pos.max() + 1 + SPAN))
            run.thaw(want)
            run.redecode()
            if reread:  # and the question read again with the fact in the cache
                run.session.eval(run.session.rewind(reread))
            rec["fact_active_after_oracle"] = float(np.isin(fact_pos, run.active()).mean())
        text = answer(run, engine, max_new)
    rec.update(text=text, correct=case.correct(text))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--policy", default="asrkf")
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--lengths", default="1000,2000,4000")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--keys", type=int, default=2)
    ap.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tasks", default="needle,multiturn,passkey")
    ap.add_argument("--set", default="{}", help="policy settings as JSON, e.g. '{\"heads\": \"max\"}'")
    a = ap.parse_args()
    settings = json.loads(a.set)
    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    rows = []
    reselects = hasattr(make_policy(a.policy), "reselect")  # the whole-read column needs question-time reselection
    t0 = time.perf_counter()
    with Engine.load(a.model, flash_attn=a.flash_attn) as eng:
        for task, length, case, fact in cases(eng, lengths, depths, a.keys):
            if task not in a.tasks.split(","):
                continue
            max_new = 8 if task == "passkey" else 24
            full = eng.generate(case.prompt, max_new, policy="full", chat=False).text
            if not case.correct(full):
                rows.append({"task": task, "length": length, "depth": case.depth, "full_correct": False})
                continue
            r = run_case(eng, a.policy, a.budget, case, fact, max_new, oracle=False, settings=settings)
            row = {"task": task, "length": length, "depth": case.depth, "answer": case.answer, "full_correct": True, **r}
            if not r["correct"]:
                o = run_case(eng, a.policy, a.budget, case, fact, max_new, oracle=True, settings=settings)
                o2 = run_case(eng, a.policy, a.budget, case, fact, max_new, oracle=True, reread=32, settings=settings)
                row.update(oracle_correct=o["correct"], oracle_text=o["text"], reread_correct=o2["correct"])
                if reselects:
                    w = run_case(eng, a.policy, a.budget, case, fact, max_new, oracle=False, settings=settings, whole_read=True)
                    row.update(whole_read_correct=w["correct"], whole_read_text=w["text"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"machine": machine(), "policy": a.policy, "settings": settings, "budget": a.budget, "flash_attn": a.flash_attn,
            "python": platform.python_version(), "minutes": (time.perf_counter() - t0) / 60}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    print(table(rows))


def _median(rows: list[dict], key: str) -> str:
    return str(int(np.median([r[key] for r in rows]))) if rows else "-"


def table(rows: list[dict]) -> str:
    lines = ["| task | length | full right | policy right | misses: answer tokens active at 1st answer token | "
             "misses: best answer rank, newest 8 rows (median) | same, question window (median) | misses fixed by oracle thaw | "
             "... and the last 32 tokens read again | misses answered when the prompt is read whole, then cut |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task in ("needle", "multiturn", "passkey"):
        for length in sorted({r["length"] for r in rows}):
            rs = [r for r in rows if r["task"] == task and r["length"] == length]
            ok = [r for r in rs if r["full_correct"]]
            miss = [r for r in ok if not r["correct"]]
            act = sum(r["answer_active"] == 1.0 for r in miss)
            fixed = sum(bool(r.get("oracle_correct")) for r in miss)
            reread = sum(bool(r.get("reread_correct")) for r in miss)
            whole = sum(bool(r.get("whole_read_correct")) for r in miss)
            lines.append(f"| {task} | {length} | {len(ok)}/{len(rs)} | {len(ok) - len(miss)}/{len(ok)} | {act}/{len(miss)} | "
                         f"{_median(miss, 'rank_newest8')} | {_median(miss, 'rank_window')} | {fixed}/{len(miss)} | {reread}/{len(miss)} | "
                         f"{whole}/{len(miss)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
