"""How many tokens the question's loan brings back, and how many its reselection froze (context 2000, 128 tokens,
budget 0.35). Usage: PYTHONPATH=. python docs/results/repay-count-s29.py TEXT..."""

import sys
from pathlib import Path

from asrkf_edge import Engine
from asrkf_edge.bench.suites import forced_decode
from asrkf_edge.policies import asrkf as policy_module
from asrkf_edge.policies import make_policy

cls = policy_module.AsrKf
orig_repay, orig_thaw = cls._repay, cls._thaw
log: list[tuple] = []


def repay(self, ctx) -> None:  # noqa: ANN001
    log.append(("lent", len(self._loan.positions), ctx.budget, ctx.n_logical))
    self._in_repay = True
    try:
        orig_repay(self, ctx)
    finally:
        self._in_repay = False


def thaw(self, ctx, positions, pin, redecode=True) -> int:  # noqa: ANN001
    if getattr(self, "_in_repay", False):
        log.append(("repaid", len(positions)))
    return orig_thaw(self, ctx, positions, pin, redecode)


cls._repay, cls._thaw = repay, thaw
with Engine.load(flash_attn=True) as eng:
    for t in sys.argv[1:]:
        toks = eng.tokenize(Path(t).read_text(), add_bos=False)[:2128]
        log.clear()
        forced_decode(eng, make_policy("asrkf"), 0.35, toks[:2000], toks[2000:])
        print(t, log, flush=True)
