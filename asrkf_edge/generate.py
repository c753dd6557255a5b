"""The one token loop under every front end (engine, chats, server, bench), as mlx-lm's ``generate_step``
under ``stream_generate``: :func:`generate_step` samples and decodes tokens; :class:`Generation` reads the
prompt, assembles UTF-8 text, holds back stop strings, stops on end of generation, a stop string, a cancel
or the length, and keeps the figures of the answer (:class:`GenerationStats`)."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

from .llama import Model, Sampler
from .runner import Runner
from .session import KvStats


@dataclass
class Sampling:
    """Sampler settings; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None


@dataclass(frozen=True)
class GenerationStats:
    """Figures of one answer: tokens, stop reason, time and speed, and the KV after it.

    ``reused_tokens``, ``context_tokens``, ``turns`` and ``context_limit`` are set for chat turns only."""

    prompt_tokens: int
    generated_tokens: int
    stop_reason: str  # "eog", "length", "stop" (a stop string) or "cancelled"
    prefill_seconds: float
    decode_seconds: float
    kv: KvStats
    reused_tokens: int | None = None
    context_tokens: int | None = None
    turns: int | None = None
    context_limit: int | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decoding (the first one's logits came with the prefill)."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0

    def as_dict(self, log: bool = True) -> dict[str, object]:
        """One flat dict under the JSON keys: the answer's figures, then the KV's (``log``: the recovery log)."""
        d: dict[str, object] = {"prompt_tokens": self.prompt_tokens}
        for key in ("reused_tokens", "context_tokens"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d.update(generated_tokens=self.generated_tokens, stop_reason=self.stop_reason,
                 prefill_seconds=self.prefill_seconds, decode_seconds=self.decode_seconds,
                 prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        d.update(self.kv.as_dict(log))
        for key in ("turns", "context_limit"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


def generate_step(runner: Runner, sampler: Sampler, max_tokens: int, is_eog: Callable[[int], bool] | None = None,
                  on_decode: Callable[[int], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> Generator[int, None, str]:
    """Yield up to ``max_tokens`` sampled tokens; each is decoded into the cache when the next is asked for
    (the last one never: nothing would read its logits). ``on_decode(token)`` runs after each decode.
    Returns why it ended: "eog" (a token ``is_eog`` accepts, not yielded), "cancelled" (``cancelled()``,
    polled before each token) or "length"."""
    for n in range(1, max_tokens + 1):
        if cancelled is not None and cancelled():
            return "cancelled"
        tok = sampler.sample(runner.session.ctx)
        if is_eog is not None and is_eog(tok):
            return "eog"
        yield tok
        if n < max_tokens:
            runner.decode(tok)
            if on_decode is not None:
                on_decode(tok)
    return "length"


class _StopMatcher:
    """Holds back text that may be the start of a stop string; reports where the first stop begins."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit (the text before it is returned)."""
        if not self.stops:
            return piece, False
        self.buf += piece
        hits = [i for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Generation:
    """One answer on a runner: iterate for its text pieces; afterwards :attr:`stats` and :attr:`text`.

    ``runner`` None: a subclass supplies one to :meth:`run`. The prompt is read first (``prompt`` tokens
    appended to what the runner holds). ``stop``: strings that end the answer (not included);
    ``cancelled``: polled before every token; ``on_token(runner)``: after every token decoded into the cache.
    :attr:`decoded` lists the generated tokens the cache holds and :attr:`failed` says a decode broke
    midway (the cache state is then unknown).
    """

    def __init__(self, runner: Runner | None, model: Model, prompt: Sequence[int], max_tokens: int, sampling: Sampling, *,
                 stop: Sequence[str] = (), cancelled: Callable[[], bool] | None = None,
                 on_token: Callable[[Runner], None] | None = None) -> None:
        self.runner, self.model, self.prompt = runner, model, prompt
        self.max_tokens, self.sampling, self.stop = max_tokens, sampling, stop
        self.cancelled, self.on_token = cancelled, on_token
        self.prefilled = False
        self.failed = False
        self.decoded: list[int] = []
        self.text = ""
        self.stats: GenerationStats | None = None

    def __iter__(self) -> Iterator[str]:
        if self.runner is None:
            raise TypeError("this Generation was made without a runner")
        return self.run(self.runner)

    def run(self, run: Runner) -> Iterator[str]:
        """The loop itself, on ``run``."""
        self.runner = run
        model = self.model
        t0 = time.perf_counter()
        run.prefill(self.prompt)
        self.prefilled = True
        t1 = time.perf_counter()
        s = self.sampling
        sampler = Sampler(s.temperature, s.top_k, s.top_p, s.seed)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        matcher = _StopMatcher(self.stop)
        pieces: list[str] = []
        n_gen, reason = 0, "length"

        def decoded(tok: int) -> None:
            self.decoded.append(tok)
            if self.on_token is not None:
                self.on_token(run)

        steps = generate_step(run, sampler, self.max_tokens, model.is_eog, decoded, self.cancelled)
        try:
            while True:
                try:
                    tok = next(steps)
                except StopIteration as end:
                    reason = end.value
                    break
                except BaseException:
                    self.failed = True
                    raise
                n_gen += 1
                out, hit = matcher.feed(dec.decode(model.piece(tok)))
                if out:
                    pieces.append(out)
                    yield out
                if hit:
                    reason = "stop"
                    break
            if reason != "stop":
                tail = matcher.feed(dec.decode(b"", final=True))[0] + matcher.flush()
                if tail:
                    pieces.append(tail)
                    yield tail
        finally:
            steps.close()
            sampler.close()
            self.text = "".join(pieces)
            self.stats = GenerationStats(len(self.prompt), n_gen, reason, t1 - t0, time.perf_counter() - t1, run.stats())
