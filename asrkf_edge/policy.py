"""KV policies behind one protocol: what leaves the cache when it is full, scored like kvpress "presses".

A policy is a small dataclass with a :meth:`Policy.score` (higher = keep); the :class:`~asrkf_edge.runner.Runner`
evicts the lowest-scoring unprotected tokens when the budget is reached. Reversible policies freeze
what leaves (it can come back); the baselines drop it. ``full`` never evicts (plain llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from .runner import Runner

Attention = Literal["ema", "sum"] | None


def default_layers(n_layer: int, count: int = 8) -> tuple[int, ...]:
    """``count`` evenly spaced layers, skipping layer 0 (its attention is mostly positional)."""
    lo = 1 if n_layer > 1 else 0
    return tuple(sorted({int(round(x)) for x in np.linspace(lo, n_layer - 1, min(count, n_layer))}))


@dataclass
class Policy:
    """Base of every policy: protected sizes, what attention it needs, and the hooks the runner calls.

    sinks, recent: first and newest tokens never evicted. window: queries observed per decode (and the
    horizon of the decayed score). layers: layers whose attention is captured (None: 8 evenly spaced).
    """

    name: ClassVar[str] = "base"
    reversible: ClassVar[bool] = False
    attention: ClassVar[Attention] = None
    bounded: ClassVar[bool] = True  # False: the cache holds the whole context, budget ignored

    sinks: int = 4
    recent: int = 16
    window: int = 32
    layers: tuple[int, ...] | None = None
    budget: float | None = None  # used when generate() gets none: fraction of the prompt or tokens
    min_cache: int = 512  # the policy's own budget never shrinks the cache below this many tokens

    def min_cells(self) -> int:
        """Smallest cache this policy can run with."""
        return self.sinks + self.recent + 32

    def score(self, runner: Runner, positions: np.ndarray) -> np.ndarray:
        """Importance of candidate positions; the lowest leave first."""
        raise NotImplementedError

    def after_decode(self, runner: Runner, pos0: int, n: int) -> None:
        """Called after every decode (prefill chunks included), attention already folded in."""

    def after_logits(self, runner: Runner) -> None:
        """Called once the logits of the next token are final (after prefill and after each token)."""

    def on_evict(self, runner: Runner, positions: np.ndarray) -> None:
        """Called with the positions about to leave the cache because it is full."""


@dataclass
class Full(Policy):
    """Plain llama.cpp: every token stays in the cache."""

    name: ClassVar[str] = "full"
    bounded: ClassVar[bool] = False

    def score(self, runner: Runner, positions: np.ndarray) -> np.ndarray:
        raise AssertionError("the full cache never evicts")


@dataclass
class Streaming(Policy):
    """StreamingLLM: attention sinks plus a sliding window; the oldest other tokens are dropped."""

    name: ClassVar[str] = "streaming"

    def score(self, runner: Runner, positions: np.ndarray) -> np.ndarray:
        return positions.astype(np.float64)


@dataclass
class H2O(Policy):
    """Heavy-hitter oracle: keep the tokens with the most accumulated attention and a recent window;
    drop the rest. Attention is accumulated from the observation window of each decode."""

    name: ClassVar[str] = "h2o"
    attention: ClassVar[Attention] = "sum"
    recent: int = 64

    def score(self, runner: Runner, positions: np.ndarray) -> np.ndarray:
        return runner.importance_of(positions)


def make_policy(name: str, **overrides: object) -> Policy:
    """A fresh policy by name (``full``, ``asrkf``, ``streaming``, ``h2o``) with fields overridden."""
    from .asrkf import AsrKf

    kinds: dict[str, type[Policy]] = {"full": Full, "asrkf": AsrKf, "streaming": Streaming, "h2o": H2O}
    if name not in kinds:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(kinds)}")
    return kinds[name](**overrides)  # type: ignore[arg-type]


POLICIES = ("full", "asrkf", "streaming", "h2o")

