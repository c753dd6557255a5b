"""Which frozen tokens the next token will read, guessed from the text before it is decoded (induction).

Where the bigram (previous token, this token) occurred before, at positions p-1 and p, a model that continues
text attends from this token to p and to what followed it (induction heads: "A B ... A" reads the B). Those
positions can be thawed before the token is decoded, from token ids alone: no attention is scored and nothing
is decoded twice, so this recall costs a small copy per token and works on any document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class BigramIndex:
    """Positions p of every bigram (tokens[p-1], tokens[p]) of a token list that grows at its end."""

    def __init__(self) -> None:
        self._at: dict[tuple[int, int], list[int]] = {}
        self.n = 0  # tokens indexed
        self.last = -1  # the newest of them

    def sync(self, n: int, tokens: Callable[[int, int], Sequence[int]]) -> None:
        """Index up to ``n`` tokens, reading new ones through ``tokens(start, stop)``; a shorter list than
        indexed (a rewind) starts over."""
        if n < self.n:
            self.__init__()  # type: ignore[misc]
        if n == self.n:
            return
        prev = self.last
        for p, t in enumerate(tokens(self.n, n), start=self.n):
            if prev >= 0:
                self._at.setdefault((prev, t), []).append(p)
            prev = t
        self.n, self.last = n, prev

    def matches(self, prev: int, token: int, limit: int) -> np.ndarray:
        """The newest ``limit`` positions p with tokens[p-1] == prev and tokens[p] == token."""
        hits = self._at.get((prev, token), [])
        return np.asarray(hits[-limit:][::-1], np.int64)


def continuations(hits: np.ndarray, span: int, n: int) -> np.ndarray:
    """Positions p..p+span of every hit, below ``n``, sorted and unique."""
    out = np.unique((hits[:, None] + np.arange(span + 1)[None, :]).ravel())
    return out[out < n]
