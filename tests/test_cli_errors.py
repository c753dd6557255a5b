"""Bad input: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from asrkf_edge.cli import main


def run_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_clean_error(res, code: int, needle: str) -> None:
    assert res.exit_code == code, res.output
    assert needle in res.output
    assert "Traceback" not in res.output


def test_missing_model():
    assert_clean_error(run_cli("run", "--model", "/no/such.gguf", "hi"), 1, "model file not found")


def test_not_gguf(tmp_path: Path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, not a model")
    assert_clean_error(run_cli("run", "--model", str(p), "hi"), 1, "not a GGUF file")


def test_truncated_gguf(tiny_path: Path, tmp_path: Path):
    data = tiny_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("run", "--model", str(p), "hi"), 1, "truncated")


def test_header_only_gguf(tmp_path: Path):
    p = tmp_path / "hdr.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    assert_clean_error(run_cli("run", "--model", str(p), "hi"), 1, "not a readable GGUF")


def test_unsupported_architecture(tmp_path: Path):
    from tiny_gguf import write_tiny_llama

    p = write_tiny_llama(tmp_path / "mamba.gguf", arch="mamba")
    assert_clean_error(run_cli("run", "--model", str(p), "hi"), 1, "unsupported architecture 'mamba'")


def test_prompt_longer_than_context(tiny_path: Path):
    res = run_cli("run", "--model", str(tiny_path), "--ctx", "32", "--raw", "the sky is blue " * 20)
    assert_clean_error(res, 1, "the context holds 32")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_bad_max_tokens(tiny_path: Path, n: str):
    assert_clean_error(run_cli("run", "--model", str(tiny_path), "--max-tokens", n, "hi"), 2, "--max-tokens")


def test_unknown_flag():
    assert_clean_error(run_cli("run", "--frobnicate", "hi"), 2, "No such option")


def test_no_prompt(tiny_path: Path):
    assert_clean_error(run_cli("run", "--model", str(tiny_path)), 2, "no prompt")


def test_process_survives_bad_model(tmp_path: Path):
    """A real process (not click's runner): llama.cpp never sees the bad file, so nothing aborts."""
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 64)
    res = subprocess.run([sys.executable, "-m", "asrkf_edge.cli", "run", "--model", str(p), "hi"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("budget", ["0", "-1", "1.5", "lots"])
def test_bad_budget(tiny_path: Path, budget: str):
    assert_clean_error(run_cli("run", "--model", str(tiny_path), "--budget", budget, "hi"), 2, "--budget")


def test_dropping_policy_without_budget(tiny_path: Path):
    assert_clean_error(run_cli("run", "--model", str(tiny_path), "--policy", "h2o", "hi"), 1, "needs a budget")


def test_unknown_policy(tiny_path: Path):
    assert_clean_error(run_cli("run", "--model", str(tiny_path), "--policy", "lru", "hi"), 2, "--policy")


def test_json_and_stats_report_the_kv(tiny_path: Path):
    import json

    prompt = "the sky is blue and the grass is green " * 12
    res = CliRunner().invoke(main, ["run", "--model", str(tiny_path), "--raw", "--budget", "100", "--stats", "--json",
                                    "-n", "30", prompt])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.splitlines()[0])
    for key in ("active_tokens_peak", "recoveries", "logical_tokens", "active_tokens", "frozen_tokens",
                "active_kv_bytes", "frozen_kv_bytes", "store_bytes", "freeze_events", "thaw_events"):
        assert key in out, key
    assert out["policy"] == "asrkf" and out["budget_tokens"] == 100
    assert out["active_tokens_peak"] <= out["budget_tokens"] < out["prompt_tokens"]
    assert out["active_tokens"] + out["frozen_tokens"] == out["logical_tokens"]
    assert "KV asrkf: logical" in res.stderr and "peak active" in res.stderr
