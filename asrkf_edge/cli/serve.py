"""``asrkf-edge serve``: the OpenAI-compatible local server (:mod:`asrkf_edge.server`)."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main
from .options import BudgetType, engine, fail, model_options, policy_option, user_errors


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True)
@model_options
@click.option("--model-id", default=None, help="Model id clients name (default: the file name without .gguf).")
@click.option("--api-key", envvar="ASRKF_EDGE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' ($ASRKF_EDGE_API_KEY).")
@policy_option("KV policy of every session.")
@click.option("--budget", type=BudgetType(), default=None, help="KV cache per session: a fraction of --ctx or tokens.")
@click.option("--ctx", type=click.IntRange(min=64), default=None, help="Most tokens a conversation may reach (default: the model's).")
@click.option("--max-sessions", type=click.IntRange(min=1), default=16, show_default=True,
              help="Named sessions kept (least recently used closed first).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Default max_tokens of a request.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
@user_errors
def serve(host: str, port: int, model: Path | None, flash_attn: bool, gpu_layers: int, model_id: str | None, api_key: str | None,
          policy: str, budget: float | None, ctx: int | None, max_sessions: int, max_tokens: int, log_level: str) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) plus /v1/kv and /health."""
    try:
        from ..server import ServerConfig, model_id_for
        from ..server import serve as run_server
    except ImportError as e:
        fail(f"{e}")
    with engine(model, flash_attn, gpu_layers) as (eng, _):
        cfg = ServerConfig(model_id=model_id or model_id_for(eng.model.path), api_key=api_key or None, policy=policy,
                           budget=budget, ctx=ctx, max_sessions=max_sessions, default_max_tokens=max_tokens)
        click.echo(f"serving {cfg.model_id} on http://{host}:{port}/v1 (policy {policy})", err=True)
        run_server(eng, host, port, cfg, log_level=log_level)
