"""Prompts with a known answer, built to a target length in tokens: passkey retrieval (the benchmark
and acceptance tests share them, so both measure the same thing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Case:
    """A prompt, the answer it asks for, its length in tokens and where the answer sits (0..1)."""

    prompt: str
    answer: str
    n_tokens: int
    depth: float

    def correct(self, text: str) -> bool:
        return self.answer in text


def passkey(tokenize: Callable[[str], list[int]], n_tokens: int, depth: float, key: int) -> Case:
    """The passkey task (Mohtashami & Jaggi): ``key`` hidden at ``depth`` in about ``n_tokens`` of filler,
    the question last. ``tokenize`` gives the length the model will see."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within 0..1, got {depth}")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenize(INTRO + needle + QUESTION))
    n_fill = max(0, round((n_tokens - fixed) / len(tokenize(FILLER * 10)) * 10))
    before = round(n_fill * depth)
    prompt = INTRO + FILLER * before + needle + FILLER * (n_fill - before) + QUESTION
    return Case(prompt, str(key), len(tokenize(prompt)), depth)
