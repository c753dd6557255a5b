"""Entropy-guided recovery: when the next-token entropy spikes, frozen context may be missing.

:class:`EntropyMonitor` keeps a running mean and variance of the entropy of generated steps and calls a
step a spike when it is above ``mean + k * std`` (after a warm-up) or above an absolute level. What to
thaw on a spike is the policy's ladder (:class:`~asrkf_edge.policies.asrkf.AsrKf`); each one is a :class:`Recovery`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class EntropyRule:
    """Spike rule. ``k``: standard deviations above the running mean; ``rise``: nats above the mean that the
    relative rule asks at least; ``absolute``: nats that always count (None: off); ``floor``: nats below which a
    step is never a spike (the model is sure); ``warmup``: steps observed before the relative rule applies;
    ``alpha``: rate of the running stats.

    ``rise``: where the entropy barely moves, k standard deviations are noise. Random weights (the GPU benches'
    models) gave 10.689 +- 0.0003 nats and 50 "spikes" in 256 tokens, each 0.001 nats or less above the mean, each a
    swap and a second decode; the default model's spikes on four texts (2k and 1k tokens, 256 generated) were
    0.67 nats above the mean or more, so 0.25 changes none of them."""

    k: float = 2.0
    rise: float = 0.25
    absolute: float | None = None
    floor: float = 1.0
    warmup: int = 8
    alpha: float = 0.05


class EntropyMonitor:
    """Running entropy statistics over generated steps; spikes are kept out of the statistics."""

    def __init__(self, rule: EntropyRule) -> None:
        self.rule = rule
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def threshold(self) -> float:
        """Entropy above which the next step is a spike (inf while warming up without an absolute level)."""
        r = self.rule
        rel = self.mean + max(r.k * math.sqrt(self.var), r.rise) if self.n >= r.warmup else math.inf
        level = min(rel, r.absolute) if r.absolute is not None else rel
        return max(level, r.floor)

    def observe(self, h: float) -> bool:
        """Record one step's entropy; True when it is a spike."""
        spike = h > self.threshold()
        if not spike:
            self.n += 1
            a = 1.0 / self.n if self.n <= self.rule.warmup else self.rule.alpha
            d = h - self.mean
            self.mean += a * d
            self.var = (1 - a) * (self.var + a * d * d)
        return spike

    def state(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "var": self.var}

    def load_state(self, state: dict[str, float]) -> None:
        self.n, self.mean, self.var = int(state["n"]), float(state["mean"]), float(state["var"])


@dataclass
class Recovery:
    """One recovery: when, why (entropy vs threshold, or attention on frozen keys), how hard (ladder level)
    and what came back."""

    step: int
    position: int
    entropy: float | None  # None: not an entropy trigger
    threshold: float | None
    level: int  # 1-3: the entropy ladder; 0: a reselection because frozen keys drew attention
    ranges: list[tuple[int, int]] = field(default_factory=list)
    thawed: int = 0
    entropy_after: float | None = None

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["ranges"] = [list(r) for r in self.ranges]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recovery:
        return cls(**{**d, "ranges": [(int(a), int(b)) for a, b in d["ranges"]]})
