"""Chat: a conversation that keeps its own KV cache and frozen store across turns.

Each turn renders the whole conversation with the model's chat template and prefills only what the
cache does not hold yet (the bytes after the text already read); the policy keeps freezing and thawing
across turns, so a long conversation fits a small cache. Generation can be cancelled from another
thread, and a callback sees the KV status after every token. One llama.cpp context per chat; every
llama.cpp call of every chat of an engine runs under ``engine.lock`` (one at a time).
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PromptTooLongError
from .llama import Sampler
from .policy import Policy, make_policy
from .runner import Runner, budget_cells

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

Message = dict[str, str]
KvCallback = Callable[[dict[str, object]], None]


def chat_cells(policy: Policy, budget: float | None, ctx: int) -> int:
    """KV cells for a chat whose conversation may reach ``ctx`` tokens.

    ``budget``: a fraction of ``ctx`` (<= 1.0) or a number of tokens (> 1), never below the policy's hard
    minimum. None: the policy's own budget (asrkf: 0.4 of ``ctx``, at least ``min_cache``); policies that
    never evict (``full``), or reversible ones without a budget, get the whole ``ctx``.
    """
    return budget_cells(policy, budget, ctx, 0)


@dataclass
class Reply:
    """One answer: its text and the turn's figures (tokens, speed, stop reason, KV)."""

    text: str
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def stop_reason(self) -> str:
        return str(self.stats.get("stop_reason", ""))


@dataclass
class Sampling:
    """Sampler settings; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None


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


class Chat:
    """A conversation with its own KV state: :meth:`send`, :meth:`stream`, :meth:`cancel`, :meth:`kv_stats`, :meth:`save`.

    Made by :meth:`Engine.chat` (or :meth:`Engine.resume`). ``ctx``: the most tokens the conversation may
    reach (default: the model's context); ``budget``/``cells``: the KV cache size (see :func:`chat_cells`).
    """

    def __init__(self, engine: Engine, *, system: str | None = None, policy: str | Policy = "asrkf",
                 budget: float | None = None, ctx: int | None = None, cells: int | None = None,
                 sampling: Sampling | None = None, name: str | None = None) -> None:
        self.engine = engine
        self.model = engine.model
        self.name = name
        self.ctx = ctx or engine.n_ctx_train
        self.policy = make_policy(policy) if isinstance(policy, str) else dataclasses.replace(policy)
        self.cells = cells or chat_cells(self.policy, budget, self.ctx)
        self.sampling = sampling or Sampling()
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self._cancel = threading.Event()
        self._cached: bytes | None = b""  # UTF-8 text whose tokens the cache holds; None: state unknown, rebuild
        self.turns = 0
        self.resets = 0
        self.last_stats: dict[str, object] = {}
        self.runner = self._new_runner()

    def _new_runner(self) -> Runner:
        return Runner(self.model, dataclasses.replace(self.policy), self.cells, flash_attn=self.engine.flash_attn)

    # lifecycle
    def close(self) -> None:
        """Free the llama.cpp context and the frozen store (waits for a running turn)."""
        with self.engine.lock:
            self.runner.close()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and its KV); optionally start with a new system message."""
        with self.engine.lock:
            self._rebuild()
            self.messages = [{"role": "system", "content": system}] if system else []

    def _rebuild(self) -> None:
        self.runner.close()
        self.runner = self._new_runner()
        self._cached = b""
        self.resets += 1

    # status
    @property
    def n_tokens(self) -> int:
        """Tokens the conversation holds in its KV (active and frozen)."""
        return self.runner.session.n_logical

    def kv_stats(self) -> dict[str, object]:
        """Logical/active/frozen tokens and bytes, events, policy, recoveries, turns (cheap: no recovery log)."""
        run = self.runner
        return {**run.session.kv_stats(), "policy": run.policy.name, "budget_tokens": run.session.budget,
                "recoveries": len(run.recoveries), "policy_seconds": run.policy_seconds, "turns": self.turns,
                "context_limit": self.ctx}

    def cancel(self) -> None:
        """Stop the running (or the next) generation after its current token; safe from any thread."""
        self._cancel.set()

    # turns
    def send(self, message: str, max_tokens: int = 256, **kwargs: object) -> Reply:
        """Add a user message and generate the whole answer."""
        stats: dict[str, object] = {}
        text = "".join(self.stream(message, max_tokens, stats=stats, **kwargs))  # type: ignore[arg-type]
        return Reply(text, stats)

    def stream(self, message: str, max_tokens: int = 256, **kwargs: object) -> Iterator[str]:
        """Add a user message and yield the answer as text pieces (see :meth:`respond` for options)."""
        return self.respond([*self.messages, {"role": "user", "content": message}], max_tokens, **kwargs)  # type: ignore[arg-type]

    def respond(self, messages: Sequence[Message], max_tokens: int = 256, *, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop: Sequence[str] = (), stats: dict[str, object] | None = None, on_kv: KvCallback | None = None,
                cancel: threading.Event | None = None) -> Iterator[str]:
        """Answer the conversation ``messages`` (the whole history, as an OpenAI request carries it).

        When the chat's history renders as a prefix of ``messages``, only the new part is prefilled;
        otherwise the KV is rebuilt from scratch. ``stop``: strings that end the answer (not included).
        ``on_kv`` gets :meth:`kv_stats` after every token; ``cancel`` (or :meth:`cancel`) stops early
        (stop_reason ``cancelled``). ``stats`` is filled when the answer is done.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        s = self.sampling
        sampling = Sampling(s.temperature if temperature is None else temperature, s.top_k if top_k is None else top_k,
                            s.top_p if top_p is None else top_p, s.seed if seed is None else seed)
        self._cancel.clear()
        return self._turn(self.model.apply_chat_template(msgs), msgs, max_tokens, sampling, list(stop), stats, on_kv, cancel)

    def complete(self, prompt: str, max_tokens: int = 256, *, stop: Sequence[str] = (), stats: dict[str, object] | None = None,
                 on_kv: KvCallback | None = None, cancel: threading.Event | None = None, **sampling: float | int | None) -> Iterator[str]:
        """Continue raw text (no chat template); a prompt that extends the previous one reuses its KV.

        Options as in :meth:`respond`; ``messages`` are left as they are.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        s = dataclasses.replace(self.sampling, **{k: v for k, v in sampling.items() if v is not None})
        self._cancel.clear()
        return self._turn(prompt, None, max_tokens, s, list(stop), stats, on_kv, cancel)

    def _plan(self, text: str) -> tuple[list[int], bool]:
        """Tokens to prefill for the rendered conversation ``text``, and whether the KV must be rebuilt."""
        data = text.encode("utf-8")
        if self._cached and data.startswith(self._cached):
            try:
                delta = data[len(self._cached) :].decode("utf-8")
            except UnicodeDecodeError:  # the cache ends inside a character: rebuild
                delta = None
            if delta:
                return self.model.tokenize(delta, add_bos=False), False
        return self.model.tokenize(text, add_bos=self.model.add_bos), self.n_tokens > 0 or self._cached is None

    def _cancelled(self, cancel: threading.Event | None) -> bool:
        return self._cancel.is_set() or (cancel is not None and cancel.is_set())

    def _turn(self, text: str, msgs: list[Message] | None, max_tokens: int, sampling: Sampling, stop: list[str],
              stats: dict[str, object] | None, on_kv: KvCallback | None, cancel: threading.Event | None) -> Iterator[str]:
        with self.engine.lock:
            tokens, rebuild = self._plan(text)
            reused = 0 if rebuild else self.n_tokens
            if reused + len(tokens) + 1 > self.ctx:
                raise PromptTooLongError(
                    f"the conversation has {reused + len(tokens)} tokens; this chat holds at most {self.ctx}")
            max_tokens = min(max_tokens, self.ctx - reused - len(tokens))
            t0 = time.perf_counter()
            n_gen, stop_reason, reply = 0, "cancelled", ""
            t1 = t0
            if not self._cancelled(cancel):
                if rebuild:
                    log.info("chat history changed: rebuilding the KV cache (%d tokens)", len(tokens))
                    self._rebuild()
                self._cached = None  # until the prefill is complete
                self.runner.prefill(tokens)
                base, gen, dirty = text.encode("utf-8"), bytearray(), False
                self._cached = base
                t1 = time.perf_counter()
                sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
                dec = codecs.getincrementaldecoder("utf-8")("replace")
                matcher = _StopMatcher(stop)
                pieces: list[str] = []
                stop_reason = "length"
                try:
                    while n_gen < max_tokens:
                        if self._cancelled(cancel):
                            stop_reason = "cancelled"
                            break
                        tok = sampler.sample(self.runner.session.ctx)
                        if self.model.is_eog(tok):
                            stop_reason = "eog"
                            break
                        n_gen += 1
                        raw = self.model.piece(tok)
                        out, hit = matcher.feed(dec.decode(raw))
                        if out:
                            pieces.append(out)
                            yield out
                        if hit:
                            stop_reason = "stop"
                            break
                        if n_gen < max_tokens:
                            dirty = True
                            self.runner.decode(tok)
                            gen += raw
                            dirty = False
                            if on_kv is not None:
                                on_kv(self.kv_stats())
                    if stop_reason != "stop":
                        tail = matcher.feed(dec.decode(b"", final=True))[0] + matcher.flush()
                        if tail:
                            pieces.append(tail)
                            yield tail
                finally:
                    sampler.close()
                    # the text the cache stands for, as the next turn's rendering will carry it
                    self._cached = None if dirty else base + bytes(gen).decode("utf-8", "replace").encode("utf-8")
                    reply = "".join(pieces)
                    if msgs is not None:
                        self.messages = [*msgs, {"role": "assistant", "content": reply}]
                    self.turns += 1
            t2 = time.perf_counter()
            self.last_stats = {
                "prompt_tokens": len(tokens),
                "reused_tokens": reused,
                "context_tokens": self.n_tokens,
                "generated_tokens": n_gen,
                "stop_reason": stop_reason,
                "prefill_seconds": t1 - t0,
                "decode_seconds": t2 - t1,
                "prefill_tokens_per_s": len(tokens) / (t1 - t0) if t1 > t0 else 0.0,
                "decode_tokens_per_s": max(n_gen - 1, 0) / (t2 - t1) if t2 > t1 and n_gen > 1 else 0.0,
                **self.kv_stats(),
            }
            if stats is not None:
                stats.update(self.last_stats)

    # persistence
    def save(self, path: str | Path) -> Path:
        """Write the conversation, its active KV, frozen store and policy state to directory ``path``."""
        from .persist import save_chat

        return save_chat(self, Path(path))
