"""Chat sessions: KV kept across turns, streaming, live KV status, cancellation, save and resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import write_tiny_llama

from asrkf_edge import AsrKf, Engine, Full, Streaming
from asrkf_edge import session as session_mod
from asrkf_edge.chat import chat_cells
from asrkf_edge.errors import PromptTooLongError, SessionFileError
from asrkf_edge.generate import _StopMatcher
from asrkf_edge.runner import Runner

FILLER = "the grass is green and the sky is blue " * 4


def test_chat_cells_follow_the_policy_budget():
    assert chat_cells(AsrKf(), None, 8192) == int(0.4 * 8192)
    assert chat_cells(AsrKf(), None, 1000) == 512  # min_cache
    assert chat_cells(AsrKf(), 200, 8192) == 200
    assert chat_cells(AsrKf(), 0.25, 1000) == 250
    assert chat_cells(Full(), 100, 4096) == 4096
    with pytest.raises(ValueError):
        chat_cells(Streaming(), None, 4096)


def test_stop_matcher_holds_back_partial_stops():
    m = _StopMatcher(["END", "xy"])
    assert m.feed("abE") == ("ab", False)
    assert m.feed("Nq") == ("ENq", False)
    assert m.feed("x") == ("", False)
    assert m.feed("yz") == ("", True)
    m = _StopMatcher(["END"])
    assert m.feed("done E") == ("done ", False)
    assert m.feed("ND and more") == ("", True)


def test_second_turn_prefills_only_the_new_part_and_matches_one_shot(tiny):
    with tiny.chat("the sky", policy="full", ctx=600) as chat:
        r1 = chat.send(FILLER, max_tokens=8)
        r2 = chat.send("pass key", max_tokens=8)
        assert r1.stats.reused_tokens == 0
        assert r2.stats.reused_tokens == r1.stats.context_tokens > 0
        assert r2.stats.prompt_tokens < r1.stats.prompt_tokens
        assert chat.messages[-1] == {"role": "assistant", "content": r2.text}
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
        # the cache reached turn by turn holds what a fresh context fed the same batches computes
        history = list(chat.runner.session.tokens)
        bounds = [*chat.runner.session._chunks, len(history)]
        with Runner(tiny.model, Full(), 600) as fresh:
            for a, b in zip(bounds, bounds[1:], strict=False):
                fresh.session.eval(history[a:b])
            assert np.array_equal(fresh.logits(), chat.runner.logits())


def test_stream_equals_send_and_reports_kv_per_token(tiny):
    seen: list[dict[str, object]] = []
    with tiny.chat(policy="full", ctx=400) as a, tiny.chat(policy="full", ctx=400) as b:
        text = "".join(a.stream("the sky is", max_tokens=10, on_kv=seen.append))
        assert text == b.send("the sky is", max_tokens=10).text
        assert a.last_stats.generated_tokens == 10
    assert len(seen) == 9  # one per decoded token (the last sampled one is not decoded)
    logical = [int(s["logical_tokens"]) for s in seen]
    assert logical == sorted(logical) and logical[-1] - logical[0] == 8
    assert {"active_tokens", "frozen_tokens", "policy", "turns"} <= set(seen[0])


def test_cancel_from_another_thread_stops_and_chat_goes_on(tiny):
    with tiny.chat(policy="full", ctx=800) as chat:
        started, asked = threading.Event(), threading.Event()
        stopper = threading.Thread(target=lambda: (started.wait(30), chat.cancel(), asked.set()))
        stopper.start()

        def on_kv(stats: dict[str, object]) -> None:
            # The first token waits until the other thread has asked: without it, the tiny model sometimes reached
            # its end of generation before that thread ran (4 runs in 20 failed so, before and after a084e44).
            started.set()
            asked.wait(30)
            started_at.append(int(stats["logical_tokens"]))

        started_at: list[int] = []
        reply = chat.send("the", max_tokens=500, on_kv=on_kv)
        stopper.join()
        assert reply.stop_reason == "cancelled"
        assert 0 < reply.stats.generated_tokens < 500
        again = chat.send("sky", max_tokens=4)
        assert again.stop_reason in ("length", "eog")
        assert again.stats.reused_tokens > 0


def test_too_long_message_is_refused_and_leaves_the_chat_alone(tiny):
    with tiny.chat(policy="full", ctx=96) as chat:
        chat.send("the sky", max_tokens=4)
        before, n = list(chat.messages), chat.n_tokens
        with pytest.raises(PromptTooLongError):
            chat.send(FILLER * 4, max_tokens=4)
        assert chat.messages == before and chat.n_tokens == n
        assert chat.send("blue", max_tokens=2).stats.reused_tokens == n


def _continue_equals_resume(engine: Engine, chat, tmp_path: Path, message: str, max_tokens: int) -> None:
    saved = chat.save(tmp_path / "chat")
    with engine.resume(saved) as resumed:
        assert resumed.messages == chat.messages
        assert resumed.kv_stats() == chat.kv_stats()
        a = chat.send(message, max_tokens=max_tokens)
        b = resumed.send(message, max_tokens=max_tokens)
        assert a.text == b.text
        assert np.array_equal(chat.runner.logits(), resumed.runner.logits())
        keys = ("context_tokens", "active_tokens", "frozen_tokens", "freeze_events", "thaw_events", "recoveries")
        assert {k: a.stats.as_dict()[k] for k in keys} == {k: b.stats.as_dict()[k] for k in keys}
    with engine.resume(saved) as again:  # the save stays intact after a resume
        assert again.send(message, max_tokens=max_tokens).text == a.text


def test_resume_continues_exactly_with_frozen_kv_tiny(tiny, tmp_path: Path):
    with tiny.chat("the sky", policy="asrkf", budget=80, ctx=1000) as chat:
        for _ in range(2):
            chat.send(FILLER, max_tokens=16)
        assert chat.kv_stats()["frozen_tokens"] > 0
        _continue_equals_resume(tiny, chat, tmp_path, "pass key of the sky", 16)


@pytest.mark.parametrize("policy", ["h2o", "shift", "streaming"])
def test_resume_continues_exactly_with_dropping_policies(tiny, tmp_path: Path, policy: str):
    with tiny.chat(policy=policy, budget=80, ctx=1000) as chat:
        chat.send(FILLER * 2, max_tokens=12)
        assert chat.kv_stats()["dropped_tokens"] > 0
        _continue_equals_resume(tiny, chat, tmp_path, "pass key of the sky", 12)


@pytest.mark.parametrize(("policy", "part"), [("asrkf", None), ("asrkf-recall", None), ("asrkf", 40), ("asrkf-q4_0", None),
                                               ("asrkf-q8_0-q4_0", None)])
def test_resume_continues_exactly_real_model(real, tmp_path: Path, policy: str, part: int | None, monkeypatch):
    """``part``: a reused blob holds that many cells, so the resume and the thaws land in parts."""
    if part:
        monkeypatch.setattr(session_mod, "BLOB_REUSE_MAX", 2 * part * real.model.n_layer * 768)  # 768 bytes a layer
    with real.chat("You are a helpful assistant.", policy=policy, budget=96, ctx=2048) as chat:
        chat.send("Name three colors of the rainbow. " * 20, max_tokens=24)
        assert chat.kv_stats()["frozen_tokens"] > 0
        _continue_equals_resume(real, chat, tmp_path, "And what is the capital of France?", 20)


def test_resume_refuses_other_model_and_version(tiny, tmp_path: Path):
    with tiny.chat(policy="full", ctx=200) as chat:
        chat.send("the sky", max_tokens=4)
        saved = chat.save(tmp_path / "chat")
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    with Engine.load(other) as eng, pytest.raises(SessionFileError, match="saved with model"):
        eng.resume(saved)
    manifest = json.loads((saved / "manifest.json").read_text())
    (saved / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(SessionFileError, match="format version 99"):
        tiny.resume(saved)
    with pytest.raises(SessionFileError, match="not a saved chat"):
        tiny.resume(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("keep")
    with tiny.chat(policy="full", ctx=200) as chat, pytest.raises(SessionFileError, match="not overwriting"):
        chat.save(tmp_path / "notes")


def test_chat_command_answers_lines_saves_and_resumes(tiny_path: Path, tmp_path: Path):
    from click.testing import CliRunner

    from asrkf_edge.cli import main

    save = tmp_path / "saved"
    args = ["chat", "--model", str(tiny_path), "--policy", "full", "--ctx", "300", "-n", "5"]
    r = CliRunner().invoke(main, [*args, "--save", str(save)], input="the sky\n/kv\nthe grass\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("KV full: logical") == 2  # a status line after each answer
    assert "KV full: logical" in r.stdout  # /kv
    assert json.loads((save / "manifest.json").read_text())["turns"] == 2
    r2 = CliRunner().invoke(main, [*args, "--resume", str(save)], input="blue\n/quit\n")
    assert r2.exit_code == 0, r2.output
    assert "resumed 4 messages" in r2.stderr
    r3 = CliRunner().invoke(main, [*args, "--resume", str(tmp_path)], input="blue\n")
    assert r3.exit_code == 1 and "not a saved chat" in r3.stderr
