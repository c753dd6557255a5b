"""asrkf's answers with the tracker as it runs when the layers are on a GPU (background fold, split capture)
against its CPU mode, on the CPU: the bench's needle, multi-turn and passkey cases, every answer side by side.

    python benchmarks/gpu_mode_on_cpu.py --lengths 1000 --budget 0.35

Checks the GPU path's changes to what is scored without a GPU (one is lent rarely and briefly); speed is not
measured here. Prints one line per case and mode, the counts right, and how many answers were the same string.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from asrkf_edge import Engine, importance, llama
from asrkf_edge.bench.suites import Plan, needle_suite, passkey_suite


def gpu_mode() -> None:
    """Make every runner and tracker made from now on run as with the layers on a CUDA GPU: the policies' GPU settings
    (``gpu_fold_layers``, no recall), background fold and split capture. The tracker's kernels
    stay serial (no GPU's cores idle here)."""
    make = importance.Importance.__init__

    def init(self: importance.Importance, *a: Any, **k: Any) -> None:
        make(self, *a, **k)
        self.parallel = False
        self.background = True
        self.split = self.flash_attn and self.sparse and self.stride > 1

    importance.Importance.__init__ = init  # type: ignore[method-assign]
    llama.Model.offloaded = property(lambda self: True)  # type: ignore[method-assign, assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1000")
    ap.add_argument("--budget", type=float, default=0.35)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    plan = Plan(policies=["asrkf"], budgets=(a.budget,), needle_lengths=lengths, lengths=lengths, keys=2, cwe_lengths=())
    answers: dict[str, list[tuple[str, bool]]] = {"cpu": [], "gpu": []}
    right: dict[str, int] = {}
    with Engine.load(None, flash_attn=True) as eng:
        for mode in ("cpu", "gpu"):
            if mode == "gpu":
                gpu_mode()
            for suite in (needle_suite, passkey_suite):
                for r in suite(eng, plan):
                    answers[mode].append((r["answer"], r["correct"]))
                    key = f"{mode} {r['target_length']} {r['task']}"
                    right[key] = right.get(key, 0) + r["correct"]
                    print(mode, r["target_length"], r["task"], r["correct"], repr(r["answer"][:60]), flush=True)
    same = sum(x == y for x, y in zip(answers["cpu"], answers["gpu"], strict=True))
    print(json.dumps({**right, "same answers": f"{same} of {len(answers['cpu'])}"}))


if __name__ == "__main__":
    main()
