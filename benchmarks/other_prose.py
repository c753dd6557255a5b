"""Needle and multi-turn recall over other prose and other facts than the bench's (a check that recall is not tuned
to the GPL haystack or the bench's eight needles): every policy on the same cases, through the bench's own needle
suite (its depths, order and scoring) with the haystack and the facts swapped.

    python benchmarks/other_prose.py --policies full,asrkf,streaming --lengths 2000 --budget 0.35

Texts default to the Apache-2.0 and MPL-2.0 licences of a Debian/Ubuntu system (``--texts`` takes any files).
Prints one line per case and policy, then the counts right as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import asrkf_edge.bench.tasks as tasks
from asrkf_edge import Engine
from asrkf_edge.bench.suites import Plan, needle_suite

FACTS = (
    tasks.Needle("The harbour master of Port Quill keeps a parrot named Biscuit.",
                 "What is the name of the harbour master's parrot?", "Biscuit"),
    tasks.Needle("Doctor Imre Halloway's lucky number is 5821.", "What is Doctor Imre Halloway's lucky number?", "5821"),
    tasks.Needle("The mountain hut above Varnsdale is painted bright orange.",
                 "What colour is the mountain hut above Varnsdale?", "orange"),
    tasks.Needle("The choir of Saint Edda rehearses every Thursday evening.",
                 "On which day does the choir of Saint Edda rehearse?", "Thursday"),
    tasks.Needle("Mira's grandmother hid the family recipe inside a violin case.",
                 "Where did Mira's grandmother hide the family recipe?", "violin case"),
    tasks.Needle("The first train to Lowmarsh leaves from platform nineteen.",
                 "From which platform does the first train to Lowmarsh leave?", "nineteen"),
    tasks.Needle("The sculptor Adaeze Okoro carved her statue from green jade.",
                 "From what stone did Adaeze Okoro carve her statue?", "jade"),
    tasks.Needle("The lighthouse on Kell Island was built by a man called Tobias Wren.",
                 "Who built the lighthouse on Kell Island?", "Tobias Wren"),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", default="full,asrkf,streaming")
    ap.add_argument("--lengths", default="2000")
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--texts", default="/usr/share/common-licenses/Apache-2.0,/usr/share/common-licenses/MPL-2.0")
    a = ap.parse_args()
    text = "\n\n".join(Path(p).read_text(encoding="utf-8") for p in a.texts.split(","))
    tasks.haystack_text = lambda: text  # the bench's case builders read the haystack and the facts from the module
    tasks.NEEDLES = FACTS
    plan = Plan(policies=a.policies.split(","), budgets=(a.budget,), needle_lengths=[int(x) for x in a.lengths.split(",")],
                keys=2, cwe_lengths=())
    right: dict[str, int] = {}
    with Engine.load(None, flash_attn=True) as eng:
        for r in needle_suite(eng, plan):
            key = f"{r['policy']} {r['target_length']} {r['task']}"
            right[key] = right.get(key, 0) + r["correct"]
            print(r["target_length"], r["task"], r["index"], r["expected"], r["policy"], r["correct"], repr(r["answer"][:70]),
                  flush=True)
    print(json.dumps(right))


if __name__ == "__main__":
    main()
