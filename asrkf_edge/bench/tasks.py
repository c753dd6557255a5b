"""Prompts with a known answer, built to a target length in tokens: passkey retrieval, a needle in natural prose
(single- and multi-turn chat) and common-words extraction (the benchmark and acceptance tests share them, so
both measure the same thing).

Answer checking (:meth:`Case.score`) is case-insensitive and ignores punctuation: text and answers are
reduced to their words (letters and digits; thousands separators inside numbers dropped) and an answer counts
when its words occur in the text as a whole-word run, so "Marzipan." and "MARZIPAN!" match "marzipan", while
"714320" does not match "71432".
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Protocol

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")
QUESTION = "What is the pass key? The pass key is"

Tokenize = Callable[[str], Sequence[Any]]
Messages = Sequence[dict[str, str]]
Render = Callable[[Messages], str]


@dataclass(frozen=True)
class Case:
    """A prompt, the answer it asks for, its length in tokens and where the answer sits (0..1).

    ``answers``: every part the answer must name (partial credit per part; default: just ``answer``).
    ``vocab``: when set, only the first ``len(answers)`` distinct words of the reply that are in it count (a
    reply can't score by listing everything). ``rendered``: the prompt is a whole chat, already through the
    chat template; generate it with ``chat=False``.
    """

    prompt: str
    answer: str
    n_tokens: int
    depth: float
    answers: tuple[str, ...] = ()
    vocab: frozenset[str] = field(default=frozenset(), repr=False)
    rendered: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        return self.answers or (self.answer,)

    def score(self, text: str) -> float:
        """Fraction of the answer's parts found in ``text`` (0..1), matched as described in the module doc."""
        parts = self.parts
        if self.vocab:
            picked: list[str] = []
            for w in _words(text):
                if w in self.vocab and w not in picked:
                    picked.append(w)
            found = sum(_norm(p) in {f" {w} " for w in picked[: len(parts)]} for p in parts)
        else:
            found = sum(_norm(p) in _norm(text) for p in parts)
        return found / len(parts)

    def correct(self, text: str) -> bool:
        """Whether ``text`` names every part of the answer."""
        return self.score(text) == 1.0


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", re.sub(r"(?<=\d)[,_](?=\d)", "", text.casefold()))


def _norm(text: str) -> str:
    return " " + " ".join(_words(text)) + " "


def passkey(tokenize: Callable[[str], list[int]], n_tokens: int, depth: float, key: int) -> Case:
    """The passkey task (Mohtashami & Jaggi): ``key`` hidden at ``depth`` in about ``n_tokens`` of filler,
    the question last. ``tokenize`` gives the length the model will see."""
    _check_depth(depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenize(INTRO + needle + QUESTION))
    n_fill = max(0, round((n_tokens - fixed) / len(tokenize(FILLER * 10)) * 10))
    before = round(n_fill * depth)
    prompt = INTRO + FILLER * before + needle + FILLER * (n_fill - before) + QUESTION
    return Case(prompt, str(key), len(tokenize(prompt)), depth)


# --- chat tasks -------------------------------------------------------------------------------------------


class _Model(Protocol):
    def apply_chat_template(self, messages: Messages) -> str: ...


class _Engine(Protocol):
    """What the chat tasks need of an :class:`~asrkf_edge.engine.Engine`."""

    model: _Model

    def prompt_tokens(self, prompt: str, chat: bool) -> list[int]: ...


def chatml(messages: Messages) -> str:
    """ChatML with the assistant's generation prompt (the default model's format), for engine-free use."""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def _tools(lm: _Engine | Tokenize, render: Render | None) -> tuple[Tokenize, Render]:
    """(tokenize, render) from an engine (its tokens and chat template) or a bare tokenizer (ChatML)."""
    if hasattr(lm, "prompt_tokens"):
        eng: Any = lm
        return (lambda s: eng.prompt_tokens(s, False)), render or eng.model.apply_chat_template
    return lm, render or chatml  # type: ignore[return-value]


@cache
def haystack_text() -> str:
    """The shipped prose haystack: the GNU GPL v3 text (package data, ``asrkf_edge/data/gpl-3.0.txt``)."""
    return resources.files("asrkf_edge").joinpath("data", "gpl-3.0.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Needle:
    """A self-contained fact absent from the haystack, the question about it and its short answer."""

    fact: str
    question: str
    answer: str


NEEDLES: tuple[Needle, ...] = (
    Needle("The name of the lighthouse keeper's cat was Marzipan.", "What was the name of the lighthouse keeper's cat?",
           "Marzipan"),
    Needle("The secret ingredient in Aunt Rosa's soup is cinnamon.", "What is the secret ingredient in Aunt Rosa's soup?",
           "cinnamon"),
    Needle("Captain Elara Voss sailed a ship called the Silver Heron.", "What was the name of Captain Elara Voss's ship?",
           "Silver Heron"),
    Needle("The old clock in the Kettleby museum was built in the year 1742.",
           "In what year was the old clock in the Kettleby museum built?", "1742"),
    Needle("The tomatoes that Professor Tamsin Reed grows in her garden are purple.",
           "What color are the tomatoes that Professor Tamsin Reed grows?", "purple"),
    Needle("The village of Brindlemere holds its lantern festival every October.",
           "In which month does the village of Brindlemere hold its lantern festival?", "October"),
    Needle("The blue bicycle was left at the train station in Oslo.", "In which city was the blue bicycle left?", "Oslo"),
    Needle("The favorite fruit of the giant named Orlo is the mango.", "What is the favorite fruit of the giant named Orlo?",
           "mango"),
)

READ = "Read the document below, then answer the question that follows it."
LATER = "Please read this document; I will ask you about it later."
ACK = "I have read the document and will answer your questions about it."
ASK = "Answer the question in a few words, from the document."
# Two unrelated turns between the document and the question in needle_multiturn (answers avoid every needle).
SMALL_TALK: tuple[tuple[str, str], ...] = (
    ("How long should I boil an egg for a soft yolk?", "About six minutes in boiling water, then cool it in cold water."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
)
_SENTENCE_END = re.compile(r"[.!?][\"')]?\s+|\n\s*")


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within 0..1, got {depth}")


def _fit(build: Callable[[int], str], count: Callable[[str], int], n_tokens: int, hi: int) -> int:
    """Largest m in 0..hi whose ``build(m)`` has at most ``n_tokens`` tokens (0 if none does)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid)) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def insert_at_depth(doc: str, needle: str, depth: float) -> str:
    """``doc`` with ``needle`` at the sentence boundary nearest ``depth`` (0..1) of its length."""
    bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(doc)), len(doc)]
    b = min(bounds, key=lambda x: abs(x - depth * len(doc)))
    if b == len(doc):
        return doc.rstrip() + "\n\n" + needle
    return doc[:b] + needle + " " + doc[b:]


def _haystack_stream(index: int, n_chars: int) -> tuple[str, list[int]]:
    """The haystack from a paragraph picked by ``index``, repeated to at least ``n_chars``; and its word ends."""
    text = haystack_text()
    paras = [0, *(m.end() for m in re.finditer(r"\n\s*\n", text))]
    start = paras[random.Random(f"haystack:{index}").randrange(len(paras))]
    stream = text[start:]
    while len(stream) < n_chars:
        stream += "\n\n" + text
    return stream, [m.end() for m in re.finditer(r"\S+", stream)]


def _needle_case(lm: _Engine | Tokenize, n_tokens: int, depth: float, index: int, render: Render | None,
                 messages: Callable[[str, Needle], list[dict[str, str]]]) -> Case:
    _check_depth(depth)
    tokenize, render = _tools(lm, render)
    nd = NEEDLES[index % len(NEEDLES)]

    def build(m: int) -> str:
        return render(messages(insert_at_depth(stream[: ends[m - 1]] if m else "", nd.fact, depth), nd))

    count = lambda s: len(tokenize(s))  # noqa: E731
    stream, ends = _haystack_stream(index, 0)
    while count(stream) < n_tokens:
        stream, ends = _haystack_stream(index, 2 * len(stream))
    m = _fit(build, count, n_tokens, len(ends))
    if m == 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for the needle prompt ({count(build(0))} tokens without prose)")
    prompt = build(m)
    return Case(prompt, nd.answer, count(prompt), depth, rendered=True)


def needle(lm: _Engine | Tokenize, n_tokens: int, depth: float, index: int, render: Render | None = None) -> Case:
    """Needle in prose: fact ``index`` (of :data:`NEEDLES`, cycled) at ``depth`` of the GPL text, the whole chat
    about ``n_tokens`` tokens; one user message (document, then the question), answered by the assistant.

    ``lm``: an Engine (its tokens and chat template) or a tokenizer (then ``render``, default :func:`chatml`).
    """
    def messages(doc: str, nd: Needle) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{READ}\n\n<document>\n{doc}\n</document>\n\nQuestion: {nd.question} {ASK}"}]

    return _needle_case(lm, n_tokens, depth, index, render, messages)


def needle_multiturn(lm: _Engine | Tokenize, n_tokens: int, depth: float, index: int, render: Render | None = None) -> Case:
    """:func:`needle` over turns: the document in turn 1 (acknowledged), two unrelated turns
    (:data:`SMALL_TALK`), then the question in the last user turn."""
    def messages(doc: str, nd: Needle) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": f"{LATER}\n\n<document>\n{doc}\n</document>"},
                {"role": "assistant", "content": ACK}]
        for q, a in SMALL_TALK:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return [*msgs, {"role": "user", "content": f"About the document: {nd.question} {ASK}"}]

    return _needle_case(lm, n_tokens, depth, index, render, messages)


# Words of the prompt and of a typical reply: kept out of the CWE lists so a reply's own phrasing never scores.
_CWE_STOP = frozenset(
    "above below about after before appear appears common frequent frequently often most words word list lists "
    "numbered following these those their there which where three four five seven eight answer question times "
    "memorize others other than that this with from have they them were while would could should".split())


@cache
def _cwe_pool() -> tuple[str, ...]:
    """Distinct words for CWE lists: the haystack's lowercase words of 5..12 letters, minus :data:`_CWE_STOP`."""
    seen = dict.fromkeys(w for w in re.findall(r"[a-z]+", haystack_text().lower()) if 5 <= len(w) <= 12)
    return tuple(w for w in seen if w not in _CWE_STOP)


def _cwe_draw(index: int, k: int, freq_common: int) -> tuple[tuple[str, ...], list[str]]:
    """The common words and the order distractor items are taken in (see :func:`cwe_words`)."""
    rng = random.Random(f"cwe:{index}:{k}:{freq_common}")
    pool = list(_cwe_pool())
    rng.shuffle(pool)
    common, rare = tuple(pool[:k]), pool[k:]
    counts = [rng.choice((1, 2)) for _ in rare]
    return common, [w for w, c in zip(rare, counts, strict=True) for _ in range(c)] + rare


def cwe_words(n_rare: int, index: int, k: int, freq_common: int) -> tuple[list[str], tuple[str, ...]]:
    """The shuffled CWE list and its ``k`` common words (``freq_common`` times each), seeded by ``index``.

    ``n_rare`` items go to distractors: word after word, each once or twice; past the pool's end (lists of
    about 8k tokens), a second pass gives them one more (at most 3)."""
    common, seq = _cwe_draw(index, k, freq_common)
    if n_rare > len(seq):
        raise ValueError(f"{n_rare} distractor items asked for; the word pool gives at most {len(seq)}")
    items = [w for w in common for _ in range(freq_common)] + seq[:n_rare]
    random.Random(f"cwe-order:{index}:{n_rare}").shuffle(items)
    return items, common


def cwe(lm: _Engine | Tokenize, n_tokens: int, index: int, k: int = 3, freq_common: int = 10,
        render: Render | None = None) -> Case:
    """Common words extraction (RULER's CWE): a numbered list of about ``n_tokens`` tokens where ``k`` words
    appear ``freq_common`` times and the rest once or twice; the reply scores the share of the ``k`` it names
    among its first ``k`` list words. ``lm`` and ``render`` as for :func:`needle`.

    A reply naming random list items scores about the share of items that are common (k=3, freq 10: ~0.3 at
    500 tokens, ~0.16 at 1k), so compare scores with that, not with zero."""
    if k < 1 or freq_common < 3:
        raise ValueError(f"need k >= 1 and freq_common >= 3, got k={k}, freq_common={freq_common}")
    tokenize, render = _tools(lm, render)
    count = lambda s: len(tokenize(s))  # noqa: E731

    def build(d: int) -> str:
        items, _ = cwe_words(d, index, k, freq_common)
        listing = "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1))
        content = (f"Below is a numbered list of words. Some of them appear many times, most only once or twice.\n\n"
                   f"{listing}\n\nQuestion: What are the {k} most common words in the above list?")
        return render([{"role": "user", "content": content}])

    most = len(_cwe_draw(index, k, freq_common)[1])
    d = _fit(build, count, n_tokens, most)
    prompt = build(d)
    if d == most and count(prompt) < 0.95 * n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is beyond the longest CWE list ({count(prompt)} tokens)")
    items, common = cwe_words(d, index, k, freq_common)
    return Case(prompt, ", ".join(common), count(prompt), 0.0, answers=common, vocab=frozenset(items), rendered=True)
