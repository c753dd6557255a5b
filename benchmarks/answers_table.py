"""Correct answers per task, length, policy and budget from `asrkf-edge bench needle|passkey --json` files.

Usage: python benchmarks/answers_table.py docs/results/gpu-quality/*.json

Records of several runs on the same cases add up; a file whose name starts with ``old-`` (a run in a checkout
of an earlier commit) is labelled ``before``. Prints a Markdown table, one column per (policy, budget).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

TASKS = ("needle", "multiturn", "passkey")


def main(paths: list[str]) -> None:
    right: dict[tuple[str, int, str], list[int]] = defaultdict(lambda: [0, 0])
    for path in paths:
        label = "before " if Path(path).name.startswith("old-") else ""
        for r in json.loads(Path(path).read_text())["records"]:
            budget = r.get("budget", None if r["policy"] == "full" else 0.35)  # older runs had one budget
            column = label + r["policy"] + (f" {budget:g}" if budget is not None else "")
            cell = right[r["task"], r.get("target_length", r["length"]), column]
            cell[0] += int(r["correct"])
            cell[1] += 1
    columns = sorted({k[2] for k in right}, key=lambda c: (c != "full", c.startswith("before"), c))
    print("| task | length | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 2) + "|")
    for task, length in sorted({k[:2] for k in right}, key=lambda t: (TASKS.index(t[0]) if t[0] in TASKS else 9, t)):
        cells = [f"{v[0]}/{v[1]}" if (v := right.get((task, length, c))) else "-" for c in columns]
        print(f"| {task} | {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
