"""Resume a saved long chat vs re-reading it: seconds until the next answer can start, default model.

Usage: python benchmarks/resume.py [--tokens 2000] [--policy asrkf] [--ctx 4096]
Builds a conversation of about ``--tokens`` tokens (turns of GPL-3 text, short answers), saves it, then
times (a) ``Engine.resume`` and (b) a fresh chat given the same history (full prefill), each up to the
first token of the next answer, and checks that both answers equal the uninterrupted chat's.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from asrkf_edge import Engine

TEXT = (Path(__file__).resolve().parent.parent / "tests" / "data" / "gpl-3.0.txt").read_text()
QUESTION = "In one sentence: what does this licence let me do?"


def first_token_seconds(stream) -> tuple[float, str]:
    t0 = time.perf_counter()
    pieces = iter(stream)
    first = next(pieces, "")
    dt = time.perf_counter() - t0
    return dt, first + "".join(pieces)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--policy", default="asrkf")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--answer", type=int, default=16, help="tokens per answer")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="asrkf-resume-"))
    out: dict[str, object] = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}}
    with Engine.load() as eng:
        words = TEXT.split()
        chat = eng.chat("You answer questions about documents.", policy=args.policy, ctx=args.ctx)
        build, turns, at = 0.0, 0, 0
        while chat.n_tokens < args.tokens:
            part = " ".join(words[at : at + 400])
            at += 400
            r = chat.send(f"Here is part {turns + 1} of a document:\n{part}\nSummarise it in a few words.", args.answer)
            build += r.stats.prefill_seconds + r.stats.decode_seconds
            turns += 1
        history = list(chat.messages)
        t0 = time.perf_counter()
        saved = chat.save(tmp / "chat")
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
        kv = chat.kv_stats()
        first_cont, cont = first_token_seconds(chat.stream(QUESTION, args.answer))
        chat.close()

        t0 = time.perf_counter()
        resumed = eng.resume(saved)
        resume_s = time.perf_counter() - t0
        first_resumed, ans_resumed = first_token_seconds(resumed.stream(QUESTION, args.answer))
        resumed.close()

        fresh = eng.chat(policy=args.policy, ctx=args.ctx)
        first_fresh, ans_fresh = first_token_seconds(fresh.respond([*history, {"role": "user", "content": QUESTION}], args.answer))
        prefill = fresh.last_stats
        assert prefill is not None
        fresh.close()
        out.update({
            "policy": args.policy, "turns": turns, "conversation_tokens": kv["logical_tokens"],
            "active_tokens": kv["active_tokens"], "frozen_tokens": kv["frozen_tokens"], "cells": kv["cells"],
            "build_seconds": build, "save_seconds": save_s, "save_bytes": size,
            "continued_to_first_token_seconds": first_cont, "resume_seconds": resume_s,
            "resume_to_first_token_seconds": resume_s + first_resumed,
            "reprefill_tokens": prefill.prompt_tokens, "reprefill_seconds": prefill.prefill_seconds,
            "reprefill_to_first_token_seconds": first_fresh,
            "resumed_answer_equals_continued": ans_resumed == cont, "reprefilled_answer_equals_continued": ans_fresh == cont,
        })
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
