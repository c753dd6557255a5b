"""``asrkf-edge bench``: every policy side by side on the same prompts (see :mod:`asrkf_edge.bench`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..policies import policy_names
from .app import main
from .options import BudgetType, engine, model_options, user_errors

if TYPE_CHECKING:
    from ..bench import Plan


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@main.command()
@click.argument("suite", type=click.Choice(["passkey", "needle", "ppl", "kld", "speed", "all"]))
@model_options
@click.option("--policies", default=",".join(policy_names()), show_default=True, help="Comma-separated policies.")
@click.option("--budget", type=BudgetType(), default=0.35, show_default=True, help="Budget for the bounded policies.")
@click.option("--budgets", default=None, help="Several budgets (e.g. 0.2,0.35,0.5,0.7): each bounded policy runs at each, "
              "and --plots draws quality against active KV (overrides --budget).")
@click.option("--lengths", default="1000,2000,4000,8000", show_default=True, help="passkey prompt lengths (tokens).")
@click.option("--needle-lengths", default="1000,2000,4000,8000", show_default=True, help="needle prompt lengths (tokens).")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Needle depths (0..1).")
@click.option("--keys", "keys", type=click.IntRange(min=1), default=1, show_default=True, help="Keys (facts) per length x depth.")
@click.option("--cwe-lengths", default="500,1000", show_default=True, help="Common-words list lengths (tokens).")
@click.option("--ppl-context", type=click.IntRange(min=64), default=4000, show_default=True, help="ppl: tokens read before scoring.")
@click.option("--ppl-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="ppl: tokens scored.")
@click.option("--speed-lengths", default="512,1000,2000,4000,8000", show_default=True, help="speed: context lengths.")
@click.option("--speed-tokens", type=click.IntRange(min=2), default=64, show_default=True, help="speed: tokens decoded.")
@click.option("--speed-runs", type=click.IntRange(min=1), default=1, show_default=True,
              help="speed: rounds of every policy, interleaved; figures of the median round, with the range.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every raw figure to this file.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path, file_okay=False), help="Write PNG charts here.")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the Markdown report here (plots linked relative to it).")
@click.option("--include", "includes", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Append this Markdown file to the report as it is (sections measured elsewhere, e.g. on a GPU).")
def bench(suite: str, model: Path | None, flash_attn: bool, gpu_layers: int, policies: str, budget: float, budgets: str | None,
          lengths: str, needle_lengths: str, depths: str, keys: int, cwe_lengths: str, ppl_context: int, ppl_tokens: int,
          speed_lengths: str, speed_tokens: int, speed_runs: int, json_path: Path | None, plots_dir: Path | None, report_path: Path | None,
          includes: tuple[Path, ...]) -> None:
    """Measure every policy side by side on the same prompts: SUITE is passkey, needle, ppl (with KL
    divergence; kld is the same), speed or all. Markdown on stdout; --json, --plots and --report write files."""
    from ..bench import Plan

    try:
        names = [p.strip() for p in policies.split(",") if p.strip()]
        bad = [p for p in names if p not in policy_names(bench=True)]
        if bad or not names:
            raise click.BadParameter(f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(policy_names(bench=True))}")
        levels = [BudgetType().convert(b, None, None) for b in budgets.split(",") if b.strip()] if budgets else [budget]
        plan = Plan(names, levels, _ints(lengths), _floats(depths), keys, _ints(needle_lengths), _ints(cwe_lengths), ppl_context,
                    ppl_tokens, _ints(speed_lengths), speed_tokens, speed_runs)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if any(not 0 <= d <= 1 for d in plan.depths):
        raise click.BadParameter("depths must lie within 0..1")
    _measure(suite, plan, model, flash_attn, gpu_layers, json_path, plots_dir, report_path, includes)


@user_errors
def _measure(suite: str, plan: Plan, model: Path | None, flash_attn: bool, gpu_layers: int, json_path: Path | None,
             plots_dir: Path | None, report_path: Path | None, includes: tuple[Path, ...]) -> None:
    from ..bench import SUITES, machine, peak_rss_mb, report

    if plots_dir is not None:
        from ..bench.plots import pyplot

        pyplot()  # fail before hours of measuring, not after
    suites = list(SUITES) if suite == "all" else ["ppl" if suite == "kld" else suite]
    records: list[dict[str, object]] = []
    t0 = time.perf_counter()
    with engine(model, flash_attn, gpu_layers) as (eng, _):
        total = sum(plan.size(s) for s in suites)
        with click.progressbar(length=total, label=f"bench {suite}", file=sys.stderr, show_pos=True,
                               item_show_func=lambda r: f"{r['suite']} {r['policy']} {r['length']}" if r else None) as bar:
            for name in suites:
                for rec in SUITES[name](eng, plan):
                    records.append(rec)
                    bar.update(1, rec)
        info = {"machine": machine(gpu=gpu_layers != 0), "model": eng.info.as_dict(), "flash_attn": flash_attn,
                "budget": ",".join(f"{b:g}" for b in plan.budgets), "plan": dataclasses.asdict(plan), "peak_rss_mb": peak_rss_mb(),
                "wall_seconds": time.perf_counter() - t0, "command": " ".join(["asrkf-edge", *sys.argv[1:]])}
    plots: list[str] = []
    if plots_dir is not None:
        from ..bench.plots import write

        base = report_path.parent if report_path is not None else Path.cwd()
        plots = [os.path.relpath(p, base) for p in write(records, plots_dir)]
    text = report(info, records, plots) + "".join("\n" + p.read_text() for p in includes)
    click.echo(text)
    if report_path is not None:
        report_path.write_text(text)
    if json_path is not None:
        json_path.write_text(json.dumps({**info, "suite": suite, "records": records}, indent=1, default=str))
