"""Recovery-trigger ablation (issue 14): asrkf variants on the bench's own needle, multi-turn and passkey cases.

Usage: python benchmarks/trigger_ablation.py [--lengths 1000,2000] [--keys 2] [--budget 0.35] [--json out.json]
       [--base asrkf-recall] [--variants b-none,c-ent-mass]

Each variant is asrkf with one setting changed, registered under its own name so that the bench runs it
beside ``full`` on the identical prompts: a-ent-rel (the paper's entropy ladder plus the always-on relevance
thaw), b-none, c-ent-mass (the default), d-mass, e-ent; ``--base asrkf-recall``: the same changes to asrkf-recall
(named r-b-none and so on). Prints one line per run (task, length, policy, correct,
recoveries, thaw events) and a per-suite summary; docs/RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

from asrkf_edge.bench.suites import Plan, needle_suite, passkey_suite
from asrkf_edge.engine import Engine
from asrkf_edge.policies import AsrKf, AsrKfRecall

VARIANTS: dict[str, dict[str, object]] = {
    "a-ent-rel": {"trigger": "entropy", "relevance_thaw": True}, "b-none": {"trigger": "none"},
    "c-ent-mass": {"trigger": "entropy-mass"}, "d-mass": {"trigger": "mass"}, "e-ent": {"trigger": "entropy"}}


def register(base: type[AsrKf], prefix: str, labels: list[str]) -> list[str]:
    """One subclass of ``base`` per variant, its defaults changed (registration is by ``name``); their names."""
    names = []
    for label in labels:
        over = VARIANTS[label]
        ns: dict[str, object] = {"name": prefix + label,
                                 "__annotations__": {"name": ClassVar[str], **{k: type(v) for k, v in over.items()}}}
        ns.update(over)
        dataclass(type("Variant_" + (prefix + label).replace("-", "_"), (base,), ns))
        names.append(prefix + label)
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1000,2000")
    ap.add_argument("--keys", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--json", default=None)
    ap.add_argument("--base", choices=("asrkf", "asrkf-recall"), default="asrkf")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    recall = a.base == "asrkf-recall"
    names = register(AsrKfRecall if recall else AsrKf, "r-" if recall else "", a.variants.split(","))
    lengths = [int(x) for x in a.lengths.split(",")]
    plan = Plan(policies=["full", *names], budgets=(a.budget,), lengths=lengths, needle_lengths=lengths, cwe_lengths=(),
                keys=a.keys)
    recs = []
    with Engine.load(flash_attn=True) as eng:
        for suite in (needle_suite, passkey_suite):
            for r in suite(eng, plan):
                recs.append(r)
                print(r["task"], r["length"], r["policy"], r["correct"], r["recoveries"], r["thaw_events"], flush=True)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(recs, f, default=str)
    table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in recs:
        t = table[r["task"], r["policy"]]
        t[0] += int(r["correct"])
        t[1] += 1
        t[2] += int(r["recoveries"])
        t[3] += int(r["thaw_events"])
    for (task, policy), (right, n, rec, thaws) in sorted(table.items()):
        print(f"{task:10s} {policy:11s} {right}/{n} correct, {rec} recoveries, {thaws} thaw events")


if __name__ == "__main__":
    main()
