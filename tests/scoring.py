"""Shared by the scoring tests: importance of a prompt read in one batch and then token by token, greedy decoding."""

from __future__ import annotations

import numpy as np

from asrkf_edge.importance import Importance
from asrkf_edge.llama import Model
from asrkf_edge.runner import Runner
from asrkf_edge.session import Session


def observed_scores(model: Model, imp: Importance, tokens: list[int], batch: int) -> np.ndarray:
    """Read ``tokens[:batch]`` in one decode, the rest one decode each, folding attention into ``imp``;
    returns the scores of those positions."""
    with Session(model, 512, flash_attn=imp.flash_attn, capture=imp.spec(),
                 on_decode=lambda s, p, n: imp.observe(s.cell_positions, p, n)) as sess:
        imp.capture = sess.capture
        sess.eval(tokens[:batch])
        for t in tokens[batch:]:
            sess.eval([t])
    return imp.scores[: len(tokens)].copy()


def rank_overlap(a: np.ndarray, b: np.ndarray, top: int = 40) -> int:
    """How many of the ``top`` highest-scoring positions two score vectors share."""
    return len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top]))


def greedy(run: Runner, n: int) -> tuple[list[int], np.ndarray]:
    """Decode ``n`` greedy tokens; returns them and the logits each was chosen from."""
    toks, logits = [], []
    for _ in range(n):
        logits.append(run.logits().copy())
        toks.append(int(np.argmax(logits[-1])))
        run.decode(toks[-1])
    return toks, np.stack(logits)
