"""OpenAI-compatible local HTTP server (Starlette + uvicorn): chat and text completions, SSE streaming, KV stats.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/kv`` (KV figures of every session). Generations run one at a time, first come first served, on
one generation thread under the engine lock (llama.cpp contexts are not thread-safe). A request names a
session with the ``X-Session-Id`` header or a ``session_id`` (else ``user``) body field: its :class:`Chat`
keeps the KV between requests, so only the new messages are prefilled. A client that disconnects mid-stream
cancels its generation. Needs the ``server`` extra: ``pip install 'asrkf-edge[server]'``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import Chat, Message
from .engine import Engine
from .errors import AsrkfError, PromptTooLongError
from .policies import DEFAULT_POLICY

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover
    raise ImportError("the server needs the 'server' extra: pip install 'asrkf-edge[server]'") from e

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ServerConfig:
    """Server settings: model id, optional API key, KV policy and sizes for each session, limits."""

    model_id: str
    api_key: str | None = None
    policy: str = DEFAULT_POLICY
    budget: float | None = None
    ctx: int | None = None
    max_sessions: int = 16
    max_queue: int = 64
    default_max_tokens: int = 512
    max_body_bytes: int = 4 << 20
    aliases: tuple[str, ...] = field(default_factory=tuple)


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class _Job:
    """One generation request, as the worker thread runs it."""

    kind: str  # "chat" or "text"
    session: str | None
    messages: list[Message]
    prompt: str
    max_tokens: int
    sampling: dict[str, Any]
    stop: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: dict[str, Any] = field(default_factory=dict)


class ChatServer:
    """Holds the engine, the named sessions and the counters; :meth:`app` is the ASGI application."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.ctx = config.ctx or engine.n_ctx_train
        self.sessions: OrderedDict[str, Chat] = OrderedDict()
        self._sessions_lock = threading.Lock()  # /v1/kv lists sessions while the generation thread adds some
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "waiting": 0, "running": 0}
        self._counter_lock = threading.Lock()
        self.created = int(time.time())
        # One generation thread, fed first come first served. Not a thread per request: llama.cpp's OpenMP
        # pool belongs to the calling thread, and decodes from several threads ran at half speed (measured).
        self._jobs: queue.Queue[tuple[_Job, Callable[[str, object], None]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    # plumbing
    def _count(self, key: str, delta: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += delta

    def _auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")

    async def _json(self, request: Request) -> dict[str, Any]:
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise ApiError(413, f"request body over {self.config.max_body_bytes} bytes", "request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"invalid JSON body: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", "invalid_json")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", "missing_model", "model")
        if model not in (self.config.model_id, *self.config.aliases):
            raise ApiError(404, f"The model '{model}' does not exist; this server has '{self.config.model_id}'.",
                           "model_not_found", "model")

    def _common(self, body: dict[str, Any], request: Request) -> dict[str, Any]:
        def num(name: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
            v = body.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
                raise ApiError(400, f"'{name}' must be a number", "invalid_value", name)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ApiError(400, f"'{name}' must be within [{lo}, {hi}]", "invalid_value", name)
            return kind(v)

        if num("n", int, 1, 1) not in (None, 1):
            raise ApiError(400, "only n=1 is supported", "unsupported_value", "n")
        max_tokens = num("max_completion_tokens", int, 1) or num("max_tokens", int, 1) or self.config.default_max_tokens
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "invalid_value", "stop")
        session = request.headers.get("x-session-id") or body.get("session_id") or body.get("user")
        if session is not None and (not isinstance(session, str) or len(session) > 256):
            raise ApiError(400, "the session id must be a string of at most 256 characters", "invalid_value", "user")
        opts = body.get("stream_options") or {}
        return {
            "max_tokens": max_tokens,
            "sampling": {"temperature": num("temperature", float, 0, 2), "top_p": num("top_p", float, 0, 1),
                         "seed": num("seed", int), "top_k": num("top_k", int, 0)},
            "stop": stops,
            "session": session or None,
            "stream": bool(body.get("stream", False)),
            "include_usage": bool(isinstance(opts, dict) and opts.get("include_usage")),
        }

    def _check_length(self, text: str) -> int:
        n = len(self.engine.tokenize(text, add_bos=self.engine.model.add_bos))
        if n + 1 > self.ctx:
            raise ApiError(400, f"This model's maximum context length is {self.ctx} tokens. However, your messages "
                                f"resulted in {n} tokens.", "context_length_exceeded", "messages")
        return n

    # the worker
    def _chat_for(self, session: str | None) -> tuple[Chat, bool]:
        """The session's chat (made on first use, least recently used evicted), or a fresh one-off chat."""
        if session is None:
            return self.engine.chat(policy=self.config.policy, budget=self.config.budget, ctx=self.ctx), True
        chat = self.sessions.get(session)
        if chat is None:
            while len(self.sessions) >= self.config.max_sessions:
                with self._sessions_lock:
                    old, gone = self.sessions.popitem(last=False)
                log.info("closing least recently used session %s", old)
                gone.close()
            chat = self.engine.chat(policy=self.config.policy, budget=self.config.budget, ctx=self.ctx, name=session)
        with self._sessions_lock:
            self.sessions[session] = chat
            self.sessions.move_to_end(session)
        return chat, False

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            self._count("waiting", -1)
            self._work(*item)

    def _work(self, job: _Job, emit: Callable[[str, object], None]) -> None:
        """Run one job (on the generation thread); emits ("piece", str), then ("done", stats) or ("error", exc)."""
        if job.cancel.is_set():  # the client left while queued
            self._count("cancelled")
            emit("done", {"stop_reason": "cancelled"})
            return
        try:
            with self.engine.lock:
                self._count("running")
                try:
                    chat, one_off = self._chat_for(job.session)
                    try:
                        if job.kind == "chat":
                            it = chat.respond(job.messages, job.max_tokens, stop=job.stop, cancel=job.cancel, **job.sampling)
                        else:
                            it = chat.complete(job.prompt, job.max_tokens, stop=job.stop, cancel=job.cancel, **job.sampling)
                        for piece in it:
                            emit("piece", piece)
                        if it.stats is not None:
                            job.stats = it.stats.as_dict(log=False)
                    finally:
                        if one_off:
                            chat.close()
                finally:
                    self._count("running", -1)
            self._count("cancelled" if job.stats.get("stop_reason") == "cancelled" else "completed")
            emit("done", job.stats)
        except Exception as e:  # reported to the client; the server stays up
            if not isinstance(e, AsrkfError | ValueError):
                log.exception("generation failed")
            self._count("failed")
            emit("error", e)

    def _start(self, job: _Job) -> asyncio.Queue[tuple[str, Any]]:
        if self.counters["waiting"] >= self.config.max_queue:
            raise ApiError(503, "too many queued requests; try again later", "server_busy", kind="server_error")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel.set()

        self._count("requests")
        self._count("waiting")
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="asrkf-generate", daemon=True)
                self._worker.start()
        self._jobs.put((job, emit))
        return events

    # responses
    @staticmethod
    def _finish(stats: dict[str, Any]) -> str:
        return "length" if stats.get("stop_reason") == "length" else "stop"

    @staticmethod
    def _usage(stats: dict[str, Any]) -> dict[str, object]:
        prompt = int(stats.get("prompt_tokens", 0)) + int(stats.get("reused_tokens", 0))
        gen = int(stats.get("generated_tokens", 0))
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen,
                "prompt_tokens_details": {"cached_tokens": int(stats.get("reused_tokens", 0))}}

    @staticmethod
    def _extras(stats: dict[str, Any]) -> dict[str, object]:
        kv = {k: stats[k] for k in ("logical_tokens", "active_tokens", "frozen_tokens", "active_kv_bytes", "frozen_kv_bytes",
                                    "active_tokens_peak", "cells", "recoveries", "policy") if k in stats}
        timings = {k: stats[k] for k in ("prefill_seconds", "decode_seconds", "prefill_tokens_per_s", "decode_tokens_per_s")
                   if k in stats}
        return {"kv": kv, "timings": timings}

    async def _collect(self, job: _Job) -> tuple[str, dict[str, Any]]:
        events = self._start(job)
        pieces: list[str] = []
        try:
            while True:
                kind, value = await events.get()
                if kind == "piece":
                    pieces.append(value)
                elif kind == "error":
                    raise self._api_error(value)
                else:
                    return "".join(pieces), value
        finally:
            job.cancel.set()  # no-op when done; stops the generation if this request was abandoned

    @staticmethod
    def _api_error(e: BaseException) -> ApiError:
        if isinstance(e, PromptTooLongError):
            return ApiError(400, str(e), "context_length_exceeded", "messages")
        if isinstance(e, AsrkfError | ValueError):
            return ApiError(400, str(e), "invalid_request")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error", kind="server_error")

    async def _sse(self, job: _Job, events: asyncio.Queue[tuple[str, Any]], chunk: Callable[..., dict[str, object]],
                   include_usage: bool) -> AsyncIterator[bytes]:
        def event(obj: object) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        try:
            first = chunk(None, None, role=True)
            if first:
                yield event(first)
            while True:
                kind, value = await events.get()
                if kind == "piece":
                    yield event(chunk(value, None))
                elif kind == "error":
                    err = self._api_error(value)
                    yield event({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}})
                    break
                else:
                    yield event({**chunk(None, self._finish(value)), **self._extras(value)})
                    if include_usage:
                        yield event({**chunk(None, None, empty=True), "usage": self._usage(value)})
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a client that went away mid-stream stops the generation and frees the engine

    # endpoints
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_id, **self.counters})

    async def models(self, request: Request) -> Response:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "asrkf-edge"}]})

    async def kv(self, request: Request) -> Response:
        self._auth(request)
        with self._sessions_lock:
            chats = list(self.sessions.items())
        sessions = [{"id": sid, "messages": len(c.messages), **c.kv_stats()} for sid, c in chats]
        return JSONResponse({"object": "kv", "model": self.config.model_id, "policy": self.config.policy,
                             "context_limit": self.ctx, "sessions": sessions, "server": dict(self.counters)})

    async def chat_completions(self, request: Request) -> Response:
        self._auth(request)
        body = await self._json(request)
        self._check_model(body)
        p = self._common(body, request)
        messages = _messages(body.get("messages"))
        self._check_length(self.engine.model.apply_chat_template(messages))
        job = _Job("chat", p["session"], messages, "", p["max_tokens"], p["sampling"], p["stop"])
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": self.config.model_id, "system_fingerprint": "asrkf-edge"}

        if not p["stream"]:
            text, stats = await self._collect(job)
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": self._finish(stats)}], "usage": self._usage(stats), **self._extras(stats)})

        def chunk(piece: str | None, finish: str | None, role: bool = False, empty: bool = False) -> dict[str, object]:
            if empty:
                return {**base, "object": "chat.completion.chunk", "choices": []}
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece}
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        events = self._start(job)
        return StreamingResponse(self._sse(job, events, chunk, p["include_usage"]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(self, request: Request) -> Response:
        self._auth(request)
        body = await self._json(request)
        self._check_model(body)
        p = self._common(body, request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "invalid_value", "prompt")
        for name in ("echo", "logprobs", "suffix", "best_of"):
            if body.get(name) not in (None, False, 1 if name == "best_of" else None):
                raise ApiError(400, f"'{name}' is not supported", "unsupported_value", name)
        self._check_length(prompt)
        job = _Job("text", p["session"], [], prompt, p["max_tokens"], p["sampling"], p["stop"])
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.config.model_id,
                "system_fingerprint": "asrkf-edge"}

        if not p["stream"]:
            text, stats = await self._collect(job)
            return JSONResponse({**base, "object": "text_completion", "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": self._finish(stats)}],
                "usage": self._usage(stats), **self._extras(stats)})

        def chunk(piece: str | None, finish: str | None, role: bool = False, empty: bool = False) -> dict[str, object]:
            if role:
                return {}
            if empty:
                return {**base, "object": "text_completion", "choices": []}
            return {**base, "object": "text_completion",
                    "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]}

        events = self._start(job)
        return StreamingResponse(self._sse(job, events, chunk, p["include_usage"]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def close(self) -> None:
        """Stop the generation thread (after its current job) and close every session's context."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(30)
            self._worker = None
        with self.engine.lock, self._sessions_lock:
            while self.sessions:
                self.sessions.popitem()[1].close()

    def app(self) -> Starlette:
        """The ASGI application."""

        async def api_error(request: Request, exc: Exception) -> Response:
            return exc.response() if isinstance(exc, ApiError) else ApiError(500, "internal error").response()

        async def not_found(request: Request, exc: Exception) -> Response:
            return ApiError(404, f"no route {request.method} {request.url.path}", "not_found").response()

        async def bad_method(request: Request, exc: Exception) -> Response:
            return ApiError(405, f"{request.method} not allowed on {request.url.path}", "method_not_allowed").response()

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/kv", self.kv, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={ApiError: api_error, 404: not_found, 405: bad_method,
                                                           Exception: api_error})


def _messages(raw: object) -> list[Message]:
    """OpenAI chat messages as role/content pairs (text parts joined); 400 on anything else."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(_ROLES)}", "invalid_value", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", "invalid_value",
                               f"messages[{i}].content")
            content = "".join(parts)  # type: ignore[arg-type]
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: content must be a string", "invalid_value", f"messages[{i}].content")
        out.append({"role": _ROLES[m["role"]], "content": content})
    return out


def model_id_for(path: str | Path) -> str:
    """The id a model is served under: its file name without ``.gguf``."""
    name = Path(path).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def create_app(engine: Engine, config: ServerConfig | None = None, **kwargs: Any) -> tuple[Starlette, ChatServer]:
    """The ASGI app for ``engine`` and its :class:`ChatServer` (settings from ``config`` or keyword arguments)."""
    cfg = config or ServerConfig(model_id=kwargs.pop("model_id", model_id_for(engine.model.path)), **kwargs)
    if cfg.model_id != engine.info.name and engine.info.name not in cfg.aliases:
        cfg.aliases = (*cfg.aliases, engine.info.name)
    server = ChatServer(engine, cfg)
    return server.app(), server


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080, config: ServerConfig | None = None,
          log_level: str = "info", **kwargs: Any) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app, server = create_app(engine, config, **kwargs)
    if host not in ("127.0.0.1", "localhost", "::1") and not server.config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        server.close()


@contextmanager
def serve_in_thread(engine: Engine, host: str = "127.0.0.1", port: int = 0, config: ServerConfig | None = None,
                    start_timeout: float = 20.0, **kwargs: Any) -> Iterator[tuple[str, ChatServer]]:
    """Run the server on a background thread of this process (an app embedding it, tests, benchmarks):
    yields its base URL and :class:`ChatServer`, then stops it. ``port`` 0 takes a free one."""
    import uvicorn

    app, server = create_app(engine, config, **kwargs)
    uv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, name="asrkf-edge-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not uv.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AsrkfError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = uv.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}", server
    finally:
        uv.should_exit = True
        thread.join(10)
        server.close()
