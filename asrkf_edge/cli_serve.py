"""``asrkf-edge chat`` (interactive terminal chat with a live KV status line) and ``asrkf-edge serve``."""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli import BudgetType, _fail, kv_line, main
from .errors import AsrkfError
from .policy import POLICIES

if TYPE_CHECKING:
    from .chat import Chat

_HELP = "commands: /save DIR, /kv, /reset, /quit (Ctrl-C stops an answer; Ctrl-D or /quit leaves)"


class _StatusBar:
    """The KV status on the terminal's last row, below a scroll region, redrawn after every token.

    Off when stdout is not a terminal: then the status is printed on stderr after each answer.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.on = enabled and sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        self.rows, self.cols = 0, 0
        if self.on:
            self.cols, self.rows = shutil.get_terminal_size()
            self.on = self.rows >= 3
        if self.on:
            sys.stdout.write(f"\n\033[1;{self.rows - 1}r\033[{self.rows - 1};1H")  # keep the last row for status
            sys.stdout.flush()

    def show(self, stats: dict[str, object]) -> None:
        if self.on:
            line = kv_line(stats)[: self.cols - 1]
            sys.stdout.write(f"\0337\033[{self.rows};1H\033[2K\033[7m{line}\033[0m\0338")
            sys.stdout.flush()

    def close(self) -> None:
        if self.on:
            sys.stdout.write(f"\0337\033[{self.rows};1H\033[2K\0338\033[r\n")
            sys.stdout.flush()


def _answer(chat: Chat, text: str, max_tokens: int, bar: _StatusBar) -> dict[str, object]:
    """Stream one answer from a worker thread so that Ctrl-C can cancel it cleanly."""
    out: queue.Queue[tuple[str, object]] = queue.Queue()
    stats: dict[str, object] = {}

    def work() -> None:
        try:
            for piece in chat.stream(text, max_tokens, stats=stats, on_kv=lambda s: out.put(("kv", s))):
                out.put(("piece", piece))
            out.put(("done", None))
        except Exception as e:  # shown to the user; the chat stays usable
            out.put(("error", e))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while True:
        try:
            kind, value = out.get()
        except KeyboardInterrupt:
            chat.cancel()
            continue
        if kind == "piece":
            click.echo(value, nl=False)
        elif kind == "kv":
            bar.show(value)  # type: ignore[arg-type]
        elif kind == "error":
            worker.join()
            raise value  # type: ignore[misc]
        else:
            break
    worker.join()
    click.echo()
    if stats.get("stop_reason") == "cancelled":
        click.echo("[stopped]", err=True)
    return stats


@main.command()
@click.option("-m", "--model", type=click.Path(path_type=Path), help="A local GGUF file (default: SmolLM2-135M-Instruct).")
@click.option("-s", "--system", default=None, help="System message.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Most tokens per answer.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Temperature; 0 = greedy.")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--ctx", type=click.IntRange(min=64), default=None, help="Most tokens the conversation may reach (default: the model's).")
@click.option("--policy", type=click.Choice(POLICIES), default="asrkf", show_default=True, help="KV policy.")
@click.option("--budget", type=BudgetType(), default=None,
              help="KV cache: a fraction of --ctx (0.4) or tokens (800). Default: the policy's (asrkf: 0.4, at least 512).")
@click.option("--resume", "resume", type=click.Path(path_type=Path, exists=True, file_okay=False), help="Continue a saved chat.")
@click.option("--save", "save", type=click.Path(path_type=Path), help="Save the chat to this directory on exit.")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (-1: all).")
def chat(model: Path | None, system: str | None, max_tokens: int, temp: float, seed: int | None, ctx: int | None, policy: str,
         budget: float | None, resume: Path | None, save: Path | None, flash_attn: bool, gpu_layers: int) -> None:
    """Chat in the terminal; the KV cache (active/frozen) is shown live. Lines on stdin work too."""
    from .chat import Sampling
    from .engine import Engine

    try:
        with Engine.load(model, n_gpu_layers=gpu_layers, flash_attn=flash_attn) as eng:
            if resume is not None:
                session = eng.resume(resume)
                click.echo(f"resumed {len(session.messages)} messages, {session.n_tokens} tokens from {resume}", err=True)
            else:
                session = eng.chat(system, policy=policy, budget=budget, ctx=ctx, sampling=Sampling(temp, seed=seed))
            interactive = sys.stdin.isatty()
            if interactive:
                click.echo(f"{eng.info.name}, {session.cells} KV cells for up to {session.ctx} tokens. {_HELP}", err=True)
            bar = _StatusBar(enabled=interactive)
            try:
                while True:
                    try:
                        line = input("> " if interactive else "")
                    except (EOFError, KeyboardInterrupt):
                        break
                    text = line.strip()
                    if not text:
                        continue
                    if text in ("/quit", "/exit"):
                        break
                    if text == "/kv":
                        click.echo(kv_line(session.kv_stats()))
                        continue
                    if text == "/reset":
                        session.reset(system)
                        continue
                    if text.startswith("/save"):
                        dest = text[5:].strip() or (str(save) if save else "")
                        if not dest:
                            click.echo("usage: /save DIR", err=True)
                            continue
                        click.echo(f"saved to {session.save(dest)}", err=True)
                        continue
                    if text == "/help":
                        click.echo(_HELP, err=True)
                        continue
                    try:
                        stats = _answer(session, line, max_tokens, bar)
                    except AsrkfError as e:
                        click.echo(f"error: {e}", err=True)
                        continue
                    if not bar.on:
                        click.echo(kv_line(stats) + f" | decode {float(stats['decode_tokens_per_s']):.1f} tok/s", err=True)  # type: ignore[arg-type]
            finally:
                bar.close()
                if save is not None:
                    click.echo(f"saved to {session.save(save)}", err=True)
                session.close()
    except AsrkfError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True)
@click.option("-m", "--model", type=click.Path(path_type=Path), help="A local GGUF file (default: SmolLM2-135M-Instruct).")
@click.option("--model-id", default=None, help="Model id clients name (default: the file name without .gguf).")
@click.option("--api-key", envvar="ASRKF_EDGE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' ($ASRKF_EDGE_API_KEY).")
@click.option("--policy", type=click.Choice(POLICIES), default="asrkf", show_default=True, help="KV policy of every session.")
@click.option("--budget", type=BudgetType(), default=None, help="KV cache per session: a fraction of --ctx or tokens.")
@click.option("--ctx", type=click.IntRange(min=64), default=None, help="Most tokens a conversation may reach (default: the model's).")
@click.option("--max-sessions", type=click.IntRange(min=1), default=16, show_default=True,
              help="Named sessions kept (least recently used closed first).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Default max_tokens of a request.")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")
@click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (-1: all).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
def serve(host: str, port: int, model: Path | None, model_id: str | None, api_key: str | None, policy: str, budget: float | None,
          ctx: int | None, max_sessions: int, max_tokens: int, flash_attn: bool, gpu_layers: int, log_level: str) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) plus /v1/kv and /health."""
    try:
        from .server import ServerConfig, model_id_for
        from .server import serve as run_server
    except ImportError as e:
        _fail(f"{e}")
    from .engine import Engine

    try:
        with Engine.load(model, n_gpu_layers=gpu_layers, flash_attn=flash_attn) as eng:
            cfg = ServerConfig(model_id=model_id or model_id_for(eng.model.path), api_key=api_key or None, policy=policy,
                               budget=budget, ctx=ctx, max_sessions=max_sessions, default_max_tokens=max_tokens)
            click.echo(f"serving {cfg.model_id} on http://{host}:{port}/v1 (policy {policy})", err=True)
            run_server(eng, host, port, cfg, log_level=log_level)
    except AsrkfError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e))
