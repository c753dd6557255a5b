"""Engine and `run` behaviour a user sees: text, streaming, stats, prompt sources, sampling."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from asrkf_edge.cli import main


def test_stream_equals_generate(tiny):
    res = tiny.generate("the sky", max_tokens=12, chat=False)
    pieces = list(tiny.stream("the sky", max_tokens=12, chat=False))
    assert "".join(pieces) == res.text
    assert res.stats.prompt_tokens == len(tiny.tokenize("the sky"))
    assert 0 < res.stats.generated_tokens <= 12
    assert res.stats.kv.logical_tokens == res.stats.prompt_tokens + res.stats.generated_tokens - (
        1 if res.stats.stop_reason == "length" else 0)


def test_seeded_sampling_repeats_and_seed_matters(tiny):
    a = tiny.generate("the", max_tokens=20, temperature=1.0, seed=7, chat=False).text
    b = tiny.generate("the", max_tokens=20, temperature=1.0, seed=7, chat=False).text
    c = tiny.generate("the", max_tokens=20, temperature=1.0, seed=8, chat=False).text
    assert a == b
    assert a != c


def test_chat_template_applied(tiny):
    raw = tiny.prompt_tokens("hi", chat=False)
    chat = tiny.prompt_tokens("hi", chat=True)
    assert len(chat) > len(raw)
    assert tiny.model.tokenize("<|im_start|>", add_bos=False)[0] in chat


def test_run_json_from_file_and_stdin(tiny_path: Path, tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("the grass is")
    r1 = CliRunner().invoke(main, ["run", "--model", str(tiny_path), "-n", "5", "--json", "-f", str(f)])
    r2 = CliRunner().invoke(main, ["run", "--model", str(tiny_path), "-n", "5", "--json", "-"], input="the grass is")
    o1, o2 = json.loads(r1.output), json.loads(r2.output)
    assert o1["text"] == o2["text"]
    for key in ("prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "active_kv_bytes", "logical_tokens"):
        assert key in o1


def test_real_model_answers(real):
    res = real.generate("What is the capital of France? Answer in one sentence.", max_tokens=30)
    assert "Paris" in res.text
    assert res.stats.stop_reason == "eog"
