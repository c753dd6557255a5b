"""The bench's ceiling for any selection shared by every layer: at every step, the exact attention of the
current query over all logical tokens (every layer's mirrored keys) picks the active set, and the token is
decoded again with it. Too slow for use (a selection and a re-decode per token); it says how much of a miss
is the selection and how much the budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .asrkf import AsrKf
from .base import PolicyContext
from .selection import choose


@dataclass
class Oracle(AsrKf):
    """Selection by the current query's attention over every logical token, in all layers, every step."""

    name: ClassVar[str] = "oracle"
    bench_only: ClassVar[bool] = True

    obs_window: int = 1
    observe_every: int = 1
    pool: int = 1

    def capture_layers(self, n_layer: int) -> tuple[int, ...]:
        return tuple(range(n_layer))

    def after_prompt(self, ctx: PolicyContext) -> None:
        """Nothing here: :meth:`after_logits` follows and selects."""

    def after_decode(self, ctx: PolicyContext, pos0: int, n: int) -> None:
        if n > 1:  # prompt chunks as asrkf reads them; each token is selected for in after_logits
            super().after_decode(ctx, pos0, n)

    def after_logits(self, ctx: PolicyContext) -> None:
        """Select for the current query, and decode the token again if the set changed (no recovery needed)."""
        imp = ctx.importance
        q, qpos = imp.recent_queries(1)
        n = ctx.n_logical
        kpos = np.arange(n, dtype=np.int64)
        score = imp.mass(q, qpos, kpos)[0]
        keep = choose(score, ctx.protected(kpos), ctx.budget - 1)
        act, frozen = ctx.active(), ctx.frozen()
        out, back = act[~keep[act]], frozen[keep[frozen]]
        if len(out):
            ctx.freeze(out)
        if len(back):
            ctx.thaw(back, redecode=False)
            ctx.reread(1)
