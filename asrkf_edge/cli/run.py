"""``asrkf-edge run``: answer one prompt, streamed, with the KV status live or as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .app import main
from .options import BudgetType, engine, kv_line, model_options, policy_option, user_errors


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


@main.command()
@click.argument("prompt", required=False)
@click.option("-f", "--file", "file", type=click.Path(path_type=Path, allow_dash=True), help="Read the prompt from FILE ('-': stdin).")
@model_options
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Temperature; 0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=0.95, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--ctx", type=click.IntRange(min=16), default=None, help="Logical context in tokens (default: the model's).")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
@policy_option("KV policy: asrkf (freeze/thaw), asrkf-recall (asrkf, frozen tokens lent back layer by layer), "
               "full (plain llama.cpp), streaming, h2o or shift (drop), q8_0 or q4_0 (llama.cpp's quantized cache).")
@click.option("--budget", type=BudgetType(), default=None,
              help="Cap the KV cache: a fraction of the prompt (0.4) or tokens (800). Default: the policy's "
                   "(asrkf: 0.4, at least 512 tokens; full: none).")
@click.option("--stats", "show_stats", is_flag=True, help="Live KV status line on stderr and a summary at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text and stats) instead of streaming.")
@user_errors
def run(prompt: str | None, file: Path | None, model: Path | None, flash_attn: bool, gpu_layers: int, max_tokens: int,
        temp: float, top_k: int, top_p: float, seed: int | None, ctx: int | None, chat: bool, policy: str,
        budget: float | None, show_stats: bool, as_json: bool) -> None:
    """Generate an answer to PROMPT and stream it."""
    text = _read_prompt(prompt, file)
    with engine(model, flash_attn, gpu_layers) as (eng, load_s):
        live = show_stats and sys.stderr.isatty()
        on_token = (lambda r: click.echo("\r\033[K" + kv_line(r.stats().as_dict()), err=True, nl=False)) if live else None
        gen = eng.stream(text, max_tokens, policy=policy, budget=budget, temperature=temp, top_k=top_k, top_p=top_p,
                         seed=seed, chat=chat, ctx=ctx, on_token=on_token)
        if as_json:
            out = "".join(gen)
            assert gen.stats is not None
            click.echo(json.dumps({"text": out, "model": eng.info.name, "load_seconds": load_s, **gen.stats.as_dict()}))
        else:
            for piece in gen:
                click.echo(piece, nl=False)
            click.echo()
        if show_stats:
            assert gen.stats is not None
            st = gen.stats
            click.echo(("\r\033[K" if live else "") + kv_line(st.as_dict()) + f" | peak active {st.kv.active_tokens_peak}"
                       f" | decode {st.decode_tokens_per_s:.1f} tok/s", err=True)
