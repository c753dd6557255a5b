"""Sublinear freeze schedule: how long a token stays frozen, and the ledger of who is frozen until when.

A token found unimportant for the c-th time is frozen for ``base * growth(c)`` decode steps (ASR-KF's
sqrt law by default: long enough to pay for the copy, short enough that a token that matters again
soon comes back). When its time runs out it returns to the cache and is judged again (rolling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

GrowthLaw = Literal["sqrt", "linear", "log", "constant"]

_LAWS = {
    "sqrt": np.sqrt,
    "linear": lambda c: c.astype(np.float64),
    "log": lambda c: 1.0 + np.log(c),
    "constant": lambda c: np.ones_like(c, np.float64),
}


@dataclass(frozen=True)
class Schedule:
    """Freeze duration ``base * law(count)`` in decode steps, count >= 1 (detections so far)."""

    base: float = 32.0
    law: GrowthLaw = "sqrt"

    def __post_init__(self) -> None:
        if self.law not in _LAWS:
            raise ValueError(f"unknown growth law {self.law!r}; choose one of {', '.join(_LAWS)}")
        if self.base <= 0:
            raise ValueError("schedule base must be positive")

    def duration(self, count: np.ndarray) -> np.ndarray:
        return np.maximum(1, np.round(self.base * _LAWS[self.law](np.maximum(count, 1)))).astype(np.int64)


HELD = np.iinfo(np.int64).max
"""``Ledger.pinned`` of a held token: pinned at every step until released."""


class Ledger:
    """Per logical position: low-importance count, step the freeze ends (-1: not frozen), pinned until."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.count = np.zeros(0, np.int32)
        self.until = np.zeros(0, np.int64)
        self.pinned = np.zeros(0, np.int64)

    def grow(self, n: int) -> None:
        if n > len(self.count):
            extra = n - len(self.count)
            self.count = np.concatenate([self.count, np.zeros(extra, np.int32)])
            self.until = np.concatenate([self.until, np.full(extra, -1, np.int64)])
            self.pinned = np.concatenate([self.pinned, np.full(extra, -1, np.int64)])

    def frozen(self, positions: np.ndarray, step: int) -> None:
        """Record that ``positions`` were found unimportant and frozen at ``step``."""
        self.grow(int(positions.max()) + 1 if len(positions) else 0)
        self.count[positions] += 1
        self.until[positions] = step + self.schedule.duration(self.count[positions])

    def thawed(self, positions: np.ndarray, step: int, pin: int = 0) -> None:
        """Record a thaw; ``pin`` steps during which the tokens may not be frozen again."""
        self.until[positions] = -1
        self.pinned[positions] = step + pin

    def hold(self, positions: np.ndarray) -> None:
        """Pin ``positions`` until :meth:`release_held` (whatever the step): tokens a read must keep."""
        self.grow(int(positions.max()) + 1 if len(positions) else 0)
        self.pinned[positions] = HELD

    def release_held(self) -> None:
        self.pinned[self.pinned == HELD] = -1

    def due(self, positions: np.ndarray, step: int) -> np.ndarray:
        """Mask of ``positions`` whose freeze has run out by ``step``."""
        self.grow(int(positions.max()) + 1 if len(positions) else 0)
        until = self.until[positions]
        return (until >= 0) & (until <= step)

    def is_pinned(self, positions: np.ndarray, step: int) -> np.ndarray:
        self.grow(int(positions.max()) + 1 if len(positions) else 0)
        return self.pinned[positions] > step

    def reset_counts(self) -> None:
        self.count[:] = 0

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count.copy(), "until": self.until.copy(), "pinned": self.pinned.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.count = state["count"].astype(np.int32)
        self.until = state["until"].astype(np.int64)
        self.pinned = state["pinned"].astype(np.int64)
