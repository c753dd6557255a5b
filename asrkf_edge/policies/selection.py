"""Choosing the active set from per-head attention scores: pool over neighbouring positions, combine the
heads, keep the best tokens (or pages of consecutive positions) up to a budget, and decide which frozen
tokens win a cell from an active one. Pure NumPy, shared by asrkf's question-time reselection, its rolling
re-evaluation and recovery swaps, and the bench's oracle.

Why pooling: a fact spans several tokens and attention finds only some of them; SnapKV pools each head's
scores over a few neighbours so a kept token keeps its neighbours. Why pages: the same at a coarser grain
(Quest, InfLLM), and whole runs of cells are cheaper to copy than scattered ones.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Combine = Literal["mean", "max"]


def pool(scores: np.ndarray, kernel: int) -> np.ndarray:
    """Max over a window of ``kernel`` positions centred on each one, along the last axis (1: unchanged). Windows
    double in width (each the maximum of two halves) up to the largest power of two in ``kernel``, and two such
    windows that overlap cover each one: 5 passes for 15. NumPy's max over a sliding window view walked the windows
    one by one: 2.1 s of a 16k prompt's 9.3 s read on an H100's host (docs/gpu.md, thirty-first session); on 2 EPYC
    cores, 1024 heads x 16,640 positions 963-986 ms -> 41-264, 128 heads 126-132 -> 4-7 (the same maxima)."""
    if kernel <= 1:
        return scores
    half, n = kernel // 2, scores.shape[-1]
    m = np.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(half, kernel - 1 - half)], constant_values=-np.inf)
    width = 1
    while 2 * width <= kernel:  # m[..., i]: the max of the padded scores [i, i + width)
        m = np.maximum(m[..., :-width], m[..., width:])
        width *= 2
    return np.maximum(m[..., :n], m[..., kernel - width : kernel - width + n])


def combine(heads: np.ndarray, how: Combine) -> np.ndarray:
    """One score per position from per-head scores [H, N]: their mean, or the most any head gives."""
    if how == "mean":
        return heads.mean(axis=0)
    if how == "max":
        return heads.max(axis=0)
    raise ValueError(f"unknown head combination {how!r}; choose mean or max")


def choose(score: np.ndarray, forced: np.ndarray, target: int, page: int = 1) -> np.ndarray:
    """Mask of at most ``max(target, forced.sum())`` positions: every ``forced`` one, then the best by
    ``score``, in whole pages of ``page`` consecutive positions (a page scores its best token) while they
    fit, the rest of the room filled token by token."""
    n = len(score)
    keep = forced.copy()
    room = target - int(keep.sum())
    if room <= 0:
        return keep
    if page > 1:
        n_pages = -(-n // page)
        padded = np.full(n_pages * page, -np.inf)
        padded[:n] = np.where(keep, -np.inf, score)
        best = padded.reshape(n_pages, page).max(axis=1)
        for p in np.argsort(-best, kind="stable"):
            if not np.isfinite(best[p]):
                break
            span = slice(p * page, min(n, (p + 1) * page))
            new = int((~keep[span]).sum())
            if new > room:
                break
            keep[span] = True
            room -= new
    if room > 0:
        free = np.flatnonzero(~keep)
        keep[free[np.argsort(-score[free], kind="stable")[:room]]] = True
    return keep


def lowest_groups(scores: np.ndarray, group: np.ndarray, need: int, most: int) -> np.ndarray:
    """Mask of the members of the groups with the lowest best score (``group[i]``: item i's group), whole groups
    taken until at least ``need`` items are in, then while they fit in ``most`` and score below infinity: what a
    full cache frees when its tokens leave in runs of cells."""
    _, inv, count = np.unique(group, return_inverse=True, return_counts=True)
    best = np.full(len(count), -np.inf)
    np.maximum.at(best, inv, scores)
    order = np.argsort(best, kind="stable")
    before = np.cumsum(count[order]) - count[order]
    take = (before < need) | ((before + count[order] <= most) & np.isfinite(best[order]))  # a prefix: sorted
    return np.isin(inv, order[take])


def winners(challengers: np.ndarray, defenders: np.ndarray, free: int) -> int:
    """How many of ``challengers`` (scores, best first) come in: the i-th takes a free cell while ``free`` last,
    then must beat the i-th of ``defenders`` (scores, weakest first); the first that does not, stops the rest."""
    rivals = np.concatenate([np.full(max(0, free), -np.inf), defenders])
    k = min(len(challengers), len(rivals))
    wins = challengers[:k] > rivals[:k]
    return k if wins.all() else int(np.argmin(wins))
