"""Which part of a bounded read loses a multi-turn answer, and whether choosing again at the question wins it back
(issue 14, the 4k multi-turn misses).

Each case of the bench's multi-turn task is read in parts, each part either with the whole cache ("W") or under the
budget ("B"), then cut to the budget by asrkf's question-time reselection (``--heads``, ``--rows`` query rows,
``--reread`` newest tokens read again) repeated ``--rounds`` times (each round scores with the rows the last one
read again), and answered greedily. Part ends: ``fs`` / ``fe`` the fact's first / past-last token, ``de`` the
document's end, ``end`` the prompt's end. ``B:end`` is asrkf's own read; ``W:end`` is SnapKV's (whole, then cut).

    python benchmarks/bounded_read.py --length 4000 --cases 4,5,7 --plans "W:end;W:fe,B:end;B:fs,W:end;B:de,W:end"

Prints one line per case and plan, and the count right per plan.
"""

from __future__ import annotations

import argparse

from recall_diagnosis import answer, spans

from asrkf_edge import Engine
from asrkf_edge.bench.suites import Plan
from asrkf_edge.bench.tasks import NEEDLES, needle_multiturn
from asrkf_edge.policies import make_policy
from asrkf_edge.policies.asrkf import AsrKf
from asrkf_edge.runner import budget_cells

DEPTHS = Plan().depths  # the bench's; with two keys, case i sits at DEPTHS[(i % 10) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4000)
    ap.add_argument("--cases", default="4,5,7", help="bench case indices (length index x 10 + depth index x 2 + key)")
    ap.add_argument("--plans", default="B:end;W:end")
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--heads", default="mean", choices=("max", "mean"))
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--reread", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    right: dict[str, int] = {}
    with Engine.load(None, flash_attn=True) as eng:
        for idx in (int(c) for c in a.cases.split(",")):
            case = needle_multiturn(eng, a.length, DEPTHS[(idx % 10) // 2], idx)
            tokens = eng.tokenize(case.prompt, add_bos=eng.model.add_bos)
            fact, _ = spans(eng, tokens, case.prompt, NEEDLES[idx % len(NEEDLES)].fact, case.answer)
            doc_end = spans(eng, tokens, case.prompt, "</document>", "</document>")[0][0]
            ends = {"fs": int(fact.min()), "fe": int(fact.max()) + 1, "de": int(doc_end), "end": len(tokens)}
            for plan in a.plans.split(";"):
                pol = make_policy("asrkf", obs_window=max(a.rows, 32))
                assert isinstance(pol, AsrKf)
                whole, bounded = budget_cells(pol, 1.0, len(tokens), 24), int(a.budget * len(tokens))
                start = 0
                with eng.runner(pol, whole) as run:
                    for part in plan.split(","):
                        mode, mark = part.split(":")
                        run.session.budget = whole if mode == "W" else bounded
                        run.prefill(tokens[start : ends[mark]], final=False)
                        start = ends[mark]
                    run.session.budget = bounded
                    back = []
                    for _ in range(a.rounds):
                        pol._ledger.grow(run.n_logical)
                        back.append(len(pol.reselect(run, reread=a.reread, rows=a.rows, heads=a.heads)))
                    run._settle()
                    text = answer(run, eng, 24)
                ok = case.correct(text)
                right[plan] = right.get(plan, 0) + ok
                print(idx, case.answer, plan, back, ok, repr(text[:90]), flush=True)
    print(right)


if __name__ == "__main__":
    main()
