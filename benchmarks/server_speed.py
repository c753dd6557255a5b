"""Decode speed through the HTTP server vs in-process, side by side, and serial vs concurrent sessions.

Usage: python benchmarks/server_speed.py [--tokens 96] [--repeat 3]
1. The same greedy request in-process (``Chat.stream`` on an app thread), then through a real uvicorn
   server (``/v1/chat/completions``, SSE, httpx), then in-process again; default model. Decode tokens/s
   measured inside the engine and, for the server, also by the client (first to last streamed token).
   Nothing decodes on the main thread and one thread decodes per phase: llama.cpp's OpenMP pool belongs
   to the calling thread, and a second thread's decodes ran at half speed once the main thread had one.
2. Two sessions: one engine, one context per session, answered one after the other on one thread
   (what the server does) vs two engines decoding at once on two threads (no shared lock): aggregate
   tokens/s, prefill included. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from asrkf_edge import Engine
from asrkf_edge.server import serve_in_thread

PROMPT = "Write a long story about a dragon who learns to bake bread. Describe every step."


def in_process(eng: Engine, tokens: int) -> dict[str, float]:
    with eng.chat(ctx=2048) as chat:
        reply = chat.send(PROMPT, tokens)
    return {"tokens": float(reply.stats.generated_tokens), "decode_tokens_per_s": reply.stats.decode_tokens_per_s}


def over_http(url: str, tokens: int) -> dict[str, float]:
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "stream": True}
    stamps: list[float] = []
    final: dict[str, object] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
            if "timings" in obj:
                final = obj
    client = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"tokens": float(len(stamps)), "decode_tokens_per_s": float(final["timings"]["decode_tokens_per_s"]),  # type: ignore[index]
            "client_tokens_per_s": client}


def sessions(eng: Engine, second: Engine | None, tokens: int) -> float:
    """Aggregate tokens/s (prefill included) of two chats: one after the other on one thread (what the
    server does), or, with ``second``, at once on two threads with an engine each (no shared lock)."""
    counts: list[int] = []

    def one(e: Engine) -> None:
        with e.chat(ctx=2048) as chat:
            counts.append(chat.send(PROMPT, tokens).stats.generated_tokens)

    jobs = [lambda: (one(eng), one(eng))] if second is None else [lambda: one(eng), lambda: one(second)]
    threads = [threading.Thread(target=j) for j in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with Engine.load() as eng:
        rows: dict[str, list[dict[str, float]]] = {"in_process": [], "server": [], "in_process_after": []}
        with serve_in_thread(eng, model_id="bench") as (url, _):  # on exit: uvicorn and the generation thread stop
            with ThreadPoolExecutor(1) as app_thread:  # an app's own generation thread
                app_thread.submit(in_process, eng, 8).result()  # warm-up (JIT, page cache)
                rows["in_process"] = [app_thread.submit(in_process, eng, args.tokens).result() for _ in range(args.repeat)]
            over_http(url, 8)
            rows["server"] = [over_http(url, args.tokens) for _ in range(args.repeat)]
        with ThreadPoolExecutor(1) as app_thread:
            rows["in_process_after"] = [app_thread.submit(in_process, eng, args.tokens).result() for _ in range(args.repeat)]
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
        serial = sessions(eng, None, args.tokens // 2)
        with Engine.load() as other:
            parallel = sessions(eng, other, args.tokens // 2)
    print(json.dumps({"median": med, "runs": rows, "two_sessions_tokens_per_s": {
        "serial_one_engine_one_thread": serial, "parallel_two_engines": parallel}}, indent=1))


if __name__ == "__main__":
    main()
