"""``asrkf-edge bench``: every suite runs every policy on the same prompts and writes JSON, Markdown and PNGs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from asrkf_edge.cli import main


@pytest.mark.real
def test_bench_all_writes_records_report_and_plots(real, tmp_path) -> None:
    out, plots, report = tmp_path / "b.json", tmp_path / "img", tmp_path / "RESULTS.md"
    args = ["bench", "all", "--policies", "full,asrkf,shift", "--budgets", "0.35,0.5", "--lengths", "300", "--needle-lengths",
            "300", "--depths", "0,1", "--cwe-lengths", "250",
            "--ppl-context", "300", "--ppl-tokens", "8", "--speed-lengths", "300", "--speed-tokens", "4", "--speed-runs", "2",
            "--json", str(out), "--plots", str(plots), "--report", str(report)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    recs = data["records"]
    by = {s: [r for r in recs if r["suite"] == s] for s in ("passkey", "needle", "ppl", "speed")}
    runs = 1 + 2 + 2  # full once, the bounded policies at each budget
    assert len(by["passkey"]) == 2 * runs and len(by["needle"]) == (2 * 2 + 1) * runs and len(by["speed"]) == 3
    ppl = {(r["policy"], r["budget"]): r for r in by["ppl"]}
    assert set(ppl) == {("full", None), ("asrkf", 0.35), ("asrkf", 0.5), ("shift", 0.35), ("shift", 0.5)}
    assert ppl["full", None]["kld_mean"] == 0.0 and ppl["full", None]["same_top"] == 1.0
    assert ppl["shift", 0.35]["kld_mean"] > 0 and ppl["shift", 0.35]["dropped_tokens"] > 0  # it lost context
    assert ppl["asrkf", 0.35]["dropped_tokens"] == 0 and ppl["asrkf", 0.35]["kv_peak_pct"] <= 36  # budget 0.35, nothing lost
    assert 36 < ppl["asrkf", 0.5]["kv_peak_pct"] <= 51
    for r in by["passkey"]:  # the same prompt for every policy
        assert r["length"] == next(q["length"] for q in by["passkey"] if q["depth"] == r["depth"] and q["policy"] == "full")
    assert all(r["decode_tokens_per_s"] > 0 and r["rss_mb"] > 0 for r in by["speed"])
    # two interleaved rounds a policy: the figures of the slower (the median's lower of two), both rounds kept
    assert all(len(r["decode_runs"]) == 2 and r["decode_tokens_per_s"] == min(r["decode_runs"]) for r in by["speed"])
    assert data["machine"]["cores"] >= 1 and data["model"]["name"]
    text = report.read_text()
    for title in ("Passkey retrieval", "Perplexity and KL divergence", "Speed and memory", "Targets", "median of runs"):
        assert title in text
    assert text.strip() in res.output
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["active_kv.png", "decode_speed.png", "frontier.png", "passkey_heatmap.png"]
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "](img/active_kv.png)" in text


def test_bench_rejects_bad_plans() -> None:
    r = CliRunner().invoke(main, ["bench", "passkey", "--policies", "full,lru"])
    assert r.exit_code == 2 and "unknown policy lru" in r.output
    r = CliRunner().invoke(main, ["bench", "passkey", "--depths", "0.5,1.5"])
    assert r.exit_code == 2 and "0..1" in r.output
    r = CliRunner().invoke(main, ["bench", "passkey", "--budget", "0"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["bench", "passkey", "--budgets", "0.35,lots"])
    assert r.exit_code == 2 and "lots" in r.output
