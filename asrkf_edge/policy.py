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

GGML_F16, GGML_Q4_0, GGML_Q8_0 = 1, 2, 8  # llama.cpp cache types (ggml_type)


def default_layers(n_layer: int, count: int = 8) -> tuple[int, ...]:
    """``count`` evenly spaced layers, skipping layer 0 (its attention is mostly positional)."""
    lo = 1 if n_layer > 1 else 0
    return tuple(sorted({int(round(x)) for x in np.linspace(lo, n_layer - 1, min(count, n_layer))}))


@dataclass
class Policy:
    """Base of every policy: protected sizes, what attention it needs, and the hooks the runner calls.

    sinks, recent: first and newest tokens never evicted. window: queries observed per decode (and the
    horizon of the decayed score). layers: layers whose attention is captured (None: 8 evenly spaced).
    observe_every: with flash attention (attention computed on the host), decode steps per observation.
    """

    name: ClassVar[str] = "base"
    reversible: ClassVar[bool] = False
    attention: ClassVar[Attention] = None
    bounded: ClassVar[bool] = True  # False: the cache holds the whole context, budget ignored
    cache_type: ClassVar[int] = GGML_F16  # K and V cache type; quantized V needs flash attention
    shift: ClassVar[bool] = False  # when full: drop the older half after the sinks and renumber (llama.cpp)

    sinks: int = 4
    recent: int = 16
    window: int = 32
    layers: tuple[int, ...] | None = None
    observe_every: int = 4
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
class Q8Cache(Full):
    """llama.cpp's own saver, ``--cache-type-k/v q8_0``: the whole context, K and V rows quantized to 8 bits."""

    name: ClassVar[str] = "q8_0"
    cache_type: ClassVar[int] = GGML_Q8_0


@dataclass
class Q4Cache(Full):
    """The same with 4-bit rows (``q4_0``)."""

    name: ClassVar[str] = "q4_0"
    cache_type: ClassVar[int] = GGML_Q4_0


@dataclass
class ContextShift(Policy):
    """llama.cpp's context shift: when the cache is full, keep the first ``sinks`` tokens, drop the older half
    of the rest and renumber positions down (what ``llama-server`` and ``llama-cli`` do at ``n_ctx``)."""

    name: ClassVar[str] = "shift"
    shift: ClassVar[bool] = True

    def score(self, runner: Runner, positions: np.ndarray) -> np.ndarray:
        raise AssertionError("context shift drops by position, not by score")


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
    """A fresh policy by name (one of :data:`POLICIES`) with fields overridden."""
    from .asrkf import AsrKf

    kinds: dict[str, type[Policy]] = {k.name: k for k in (Full, AsrKf, Streaming, H2O, Q8Cache, Q4Cache, ContextShift)}
    if name not in kinds:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(kinds)}")
    return kinds[name](**overrides)  # type: ignore[arg-type]


POLICIES = ("full", "asrkf", "streaming", "h2o", "q8_0", "q4_0", "shift")

