"""Chat: a conversation that keeps its own KV cache and frozen store across turns.

Each turn renders the whole conversation with the model's chat template and prefills only what the
cache does not hold yet (the bytes after the text already read); the policy keeps freezing and thawing
across turns, so a long conversation fits a small cache. Generation can be cancelled from another
thread, and a callback sees the KV status after every token. One llama.cpp context per chat; every
llama.cpp call of every chat of an engine runs under ``engine.lock`` (one at a time).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import persist
from .errors import AsrkfError, PromptTooLongError, SessionFileError
from .generate import Generation, GenerationStats, Sampling
from .models import fingerprint
from .policies import DEFAULT_POLICY, Policy, make_policy, policy_class
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
    stats: GenerationStats

    @property
    def stop_reason(self) -> str:
        return self.stats.stop_reason


class Turn:
    """One chat answer as text pieces (iterate once); ``stats`` (:class:`GenerationStats`) and ``text`` after."""

    def __init__(self, run: Callable[[Turn], Iterator[str]]) -> None:
        self._run = run
        self.stats: GenerationStats | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        return self._run(self)


class Chat:
    """A conversation with its own KV state: :meth:`send`, :meth:`stream`, :meth:`cancel`, :meth:`kv_stats`, :meth:`save`.

    Made by :meth:`Engine.chat` (or :meth:`Engine.resume`). ``ctx``: the most tokens the conversation may
    reach (default: the model's context); ``budget``/``cells``: the KV cache size (see :func:`chat_cells`).
    """

    def __init__(self, engine: Engine, *, system: str | None = None, policy: str | Policy = DEFAULT_POLICY,
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
        self.last_stats: GenerationStats | None = None
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
        """The KV status as JSON values: logical/active/frozen tokens and bytes, events, policy, recoveries,
        turns (no recovery log)."""
        return {**self.runner.stats().as_dict(log=False), "turns": self.turns, "context_limit": self.ctx}

    def cancel(self) -> None:
        """Stop the running (or the next) generation after its current token; safe from any thread."""
        self._cancel.set()

    # turns
    def send(self, message: str, max_tokens: int = 256, **kwargs: Any) -> Reply:
        """Add a user message and generate the whole answer."""
        turn = self.stream(message, max_tokens, **kwargs)
        text = "".join(turn)
        assert turn.stats is not None
        return Reply(text, turn.stats)

    def stream(self, message: str, max_tokens: int = 256, **kwargs: Any) -> Turn:
        """Add a user message and yield the answer as text pieces (see :meth:`respond` for options)."""
        return self.respond([*self.messages, {"role": "user", "content": message}], max_tokens, **kwargs)

    def respond(self, messages: Sequence[Message], max_tokens: int = 256, *, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop: Sequence[str] = (), on_kv: KvCallback | None = None, cancel: threading.Event | None = None) -> Turn:
        """Answer the conversation ``messages`` (the whole history, as an OpenAI request carries it).

        When the chat's history renders as a prefix of ``messages``, only the new part is prefilled;
        otherwise the KV is rebuilt from scratch. ``stop``: strings that end the answer (not included).
        ``on_kv`` gets :meth:`kv_stats` after every token; ``cancel`` (or :meth:`cancel`) stops early
        (stop_reason ``cancelled``). The returned :class:`Turn` has ``stats`` when the answer is done.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        s = self.sampling
        sampling = Sampling(s.temperature if temperature is None else temperature, s.top_k if top_k is None else top_k,
                            s.top_p if top_p is None else top_p, s.seed if seed is None else seed)
        self._cancel.clear()
        text = self.model.apply_chat_template(msgs)
        return Turn(lambda t: self._turn(t, text, msgs, max_tokens, sampling, list(stop), on_kv, cancel))

    def complete(self, prompt: str, max_tokens: int = 256, *, stop: Sequence[str] = (), on_kv: KvCallback | None = None,
                 cancel: threading.Event | None = None, **sampling: float | int | None) -> Turn:
        """Continue raw text (no chat template); a prompt that extends the previous one reuses its KV.

        Options as in :meth:`respond`; ``messages`` are left as they are.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        s = dataclasses.replace(self.sampling, **{k: v for k, v in sampling.items() if v is not None})
        self._cancel.clear()
        return Turn(lambda t: self._turn(t, prompt, None, max_tokens, s, list(stop), on_kv, cancel))

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

    def _turn(self, turn: Turn, text: str, msgs: list[Message] | None, max_tokens: int, sampling: Sampling,
              stop: list[str], on_kv: KvCallback | None, cancel: threading.Event | None) -> Iterator[str]:
        with self.engine.lock:
            tokens, rebuild = self._plan(text)
            reused = 0 if rebuild else self.n_tokens
            if reused + len(tokens) + 1 > self.ctx:
                raise PromptTooLongError(
                    f"the conversation has {reused + len(tokens)} tokens; this chat holds at most {self.ctx}")
            max_tokens = min(max_tokens, self.ctx - reused - len(tokens))
            on_token = (lambda _run: on_kv(self.kv_stats())) if on_kv is not None else None
            gen = Generation(self.runner, self.model, tokens, max_tokens, sampling, stop=stop,
                             cancelled=lambda: self._cancelled(cancel), on_token=on_token)
            if self._cancelled(cancel):
                stats = GenerationStats(len(tokens), 0, "cancelled", 0.0, 0.0, self.runner.stats())
            else:
                if rebuild:
                    log.info("chat history changed: rebuilding the KV cache (%d tokens)", len(tokens))
                    self._rebuild()
                    gen.runner = self.runner
                self._cached = None  # until the prefill is complete
                base = text.encode("utf-8")
                try:
                    yield from gen
                finally:
                    if gen.prefilled:
                        # the text the cache stands for, as the next turn's rendering will carry it
                        done = b"".join(self.model.piece(t) for t in gen.decoded)
                        self._cached = None if gen.failed else base + done.decode("utf-8", "replace").encode("utf-8")
                        if msgs is not None:
                            self.messages = [*msgs, {"role": "assistant", "content": gen.text}]
                        self.turns += 1
                assert gen.stats is not None
                stats = gen.stats
            turn.text = gen.text
            turn.stats = self.last_stats = dataclasses.replace(
                stats, reused_tokens=reused, context_tokens=self.n_tokens, turns=self.turns, context_limit=self.ctx,
                kv=self.runner.stats())

    # persistence
    def state(self) -> dict[str, Any]:
        """Everything :meth:`load` needs: settings, messages, the text the cache stands for, and the runner."""
        if self._cached is None:
            raise SessionFileError("the chat's last turn failed midway; send a message or reset before saving")
        return {"model": {"name": self.engine.info.name, "size": self.model.path.stat().st_size,
                          "fingerprint": fingerprint(self.model.path)},
                "flash_attn": self.engine.flash_attn, "ctx": self.ctx, "cells": self.cells, "name": self.name,
                "turns": self.turns, "resets": self.resets, "sampling": dataclasses.asdict(self.sampling),
                "messages": self.messages, "cached": base64.b64encode(self._cached).decode("ascii"),
                "policy": {"name": self.policy.name, "config": self.policy.config()},
                "runner": self.runner.state(), "kv": self.kv_stats()}

    def save(self, path: str | Path) -> Path:
        """Write the conversation, its active KV, frozen store and policy state to directory ``path``."""
        with self.engine.lock:
            return persist.write(Path(path), self.state())

    @classmethod
    def load(cls, engine: Engine, path: Path) -> Chat:
        """Resume a chat saved by :meth:`save` on ``engine`` (same model, same flash-attention setting)."""
        state = persist.read(path)
        model = state["model"]
        if model["fingerprint"] != fingerprint(engine.model.path):
            raise SessionFileError(f"{path} was saved with model {model['name']} ({model['size']} bytes); "
                                   f"this engine runs {engine.info.name} ({engine.model.path.stat().st_size} bytes)")
        if bool(state["flash_attn"]) != engine.flash_attn:
            raise SessionFileError(f"{path} was saved with flash attention {'on' if state['flash_attn'] else 'off'}; "
                                   "load the engine with the same setting")
        pol = state["policy"]
        try:
            policy = policy_class(pol["name"]).from_config(pol["config"])
        except ValueError as e:
            raise SessionFileError(f"saved chat uses policy {pol['name']!r}, which this version does not have") from e
        chat = cls(engine, policy=policy, ctx=int(state["ctx"]), cells=int(state["cells"]),
                   sampling=Sampling(**state["sampling"]), name=state.get("name"))
        try:
            with engine.lock:
                chat.runner.load_state(state["runner"])
        except (AsrkfError, ValueError, KeyError) as e:
            chat.close()
            raise SessionFileError(f"{path}: cannot restore the saved KV ({e})") from e
        except BaseException:
            chat.close()
            raise
        chat.messages = list(state["messages"])
        chat._cached = base64.b64decode(state["cached"])
        chat.turns, chat.resets = int(state["turns"]), int(state["resets"])
        log.info("resumed chat (%d tokens) from %s", chat.n_tokens, path)
        return chat
