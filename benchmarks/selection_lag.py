"""How much of the KL divergence a selection loses by choosing from queries older than the token it serves.

Usage: python benchmarks/selection_lag.py '[["label", "policy", budget, {overrides}], ...]' [kld_variants' options]

Registers two bench-only yardsticks beside the package's ``oracle`` and ``oracle-next``, then runs
benchmarks/kld_variants.py's loop (context 2000, 128 forced tokens, mean KLD from full):

- ``oracle-hold``: every ``every`` steps the newest query's exact attention (all layers) re-chooses the whole set,
  which then serves the next ``every`` tokens (no second decode; ``every`` 1 is ``oracle-next``).
- ``oracle-layers``: the oracle with its ``layers`` only, e.g. the first third of the model (what a decode stopped
  early could see of the token's own query).

Example (docs/RESULTS.md, ninth session): '[["next","oracle-next",0.35,{}],["hold4","oracle-hold",0.35,{"every":4}],
["hold8","oracle-hold",0.35,{"every":8}],["first half","oracle-layers",0.35,{"layers":[1,2,...,15]}]]' --text FILE
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kld_variants import main

from asrkf_edge.policies import Oracle, OracleNext
from asrkf_edge.policies.base import PolicyContext


@dataclass
class OracleHold(OracleNext):
    """oracle-next re-choosing only every ``every`` steps: the set serves the ``every`` tokens that follow."""

    name: ClassVar[str] = "oracle-hold"
    every: int = 8

    def after_logits(self, ctx: PolicyContext) -> None:
        if ctx.step % self.every == 0:
            super().after_logits(ctx)


@dataclass
class OracleLayers(Oracle):
    """The oracle scored with its ``layers`` only."""

    name: ClassVar[str] = "oracle-layers"

    def capture_layers(self, n_layer: int) -> tuple[int, ...]:
        return self.layers or tuple(range(n_layer))


if __name__ == "__main__":
    main()
