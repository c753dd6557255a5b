"""The dropping baselines: what leaves the cache is gone (StreamingLLM, H2O, llama.cpp's context shift)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Attention, Policy, PolicyContext, ScoringPolicy


@dataclass
class Streaming(ScoringPolicy):
    """StreamingLLM: attention sinks plus a sliding window; the oldest other tokens are dropped."""

    name: ClassVar[str] = "streaming"

    def score(self, ctx: PolicyContext, positions: np.ndarray) -> np.ndarray:
        return positions.astype(np.float64)


@dataclass
class H2O(ScoringPolicy):
    """Heavy-hitter oracle: keep the tokens with the most accumulated attention and a recent window;
    drop the rest. Attention is accumulated from the observation window of each decode."""

    name: ClassVar[str] = "h2o"
    attention: ClassVar[Attention] = "sum"
    recent: int = 64

    def score(self, ctx: PolicyContext, positions: np.ndarray) -> np.ndarray:
        return ctx.importance.of(positions)


@dataclass
class ContextShift(Policy):
    """llama.cpp's context shift: when the cache is full, keep the first ``sinks`` tokens, drop the older half
    of the rest and renumber positions down (what ``llama-server`` and ``llama-cli`` do at ``n_ctx``)."""

    name: ClassVar[str] = "shift"
    shift: ClassVar[bool] = True
