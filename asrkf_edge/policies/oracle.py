"""The bench's ceilings for any selection shared by every layer: at every step, the exact attention of a query
over all logical tokens (every layer's mirrored keys) picks the active set. ``oracle`` picks it for the current
token's own query and decodes the token again with it; ``oracle-next`` picks it with the current query for the
token that comes next and never decodes twice: the most a policy can get without a second decode. Too slow for
use (a selection, and for ``oracle`` a re-decode, per token); they say how much of a miss is the selection, how
much the budget and how much the lag of a query behind the token it chooses for."""

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
    again: ClassVar[bool] = True  # decode the token again with the set chosen for it

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
        """Select by the current query; decode the token again if the set changed (``again``), or leave the set
        for the next token."""
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
            if self.again:
                ctx.reread(1)


@dataclass
class OracleNext(Oracle):
    """The oracle one step late: the current query picks the set the next token is decoded with."""

    name: ClassVar[str] = "oracle-next"
    again: ClassVar[bool] = False
