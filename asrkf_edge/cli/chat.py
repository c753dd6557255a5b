"""``asrkf-edge chat``: an interactive terminal chat with a live KV status line, /save and --resume."""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import AsrkfError
from .app import main
from .options import BudgetType, engine, kv_line, model_options, policy_option, user_errors

if TYPE_CHECKING:
    from ..chat import Chat
    from ..generate import GenerationStats

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

    def show(self, stats: dict[str, Any]) -> None:
        if self.on:
            line = kv_line(stats)[: self.cols - 1]
            sys.stdout.write(f"\0337\033[{self.rows};1H\033[2K\033[7m{line}\033[0m\0338")
            sys.stdout.flush()

    def close(self) -> None:
        if self.on:
            sys.stdout.write(f"\0337\033[{self.rows};1H\033[2K\0338\033[r\n")
            sys.stdout.flush()


def _answer(chat: Chat, text: str, max_tokens: int, bar: _StatusBar) -> GenerationStats | None:
    """Stream one answer from a worker thread so that Ctrl-C can cancel it cleanly."""
    out: queue.Queue[tuple[str, Any]] = queue.Queue()
    turn = chat.stream(text, max_tokens, on_kv=lambda s: out.put(("kv", s)))

    def work() -> None:
        try:
            for piece in turn:
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
            bar.show(value)
        elif kind == "error":
            worker.join()
            raise value
        else:
            break
    worker.join()
    click.echo()
    if turn.stats is not None and turn.stats.stop_reason == "cancelled":
        click.echo("[stopped]", err=True)
    return turn.stats


@main.command()
@model_options
@click.option("-s", "--system", default=None, help="System message.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Most tokens per answer.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Temperature; 0 = greedy.")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--ctx", type=click.IntRange(min=64), default=None, help="Most tokens the conversation may reach (default: the model's).")
@policy_option()
@click.option("--budget", type=BudgetType(), default=None,
              help="KV cache: a fraction of --ctx (0.4) or tokens (800). Default: the policy's (asrkf: 0.4, at least 512).")
@click.option("--resume", "resume", type=click.Path(path_type=Path, exists=True, file_okay=False), help="Continue a saved chat.")
@click.option("--save", "save", type=click.Path(path_type=Path), help="Save the chat to this directory on exit.")
@user_errors
def chat(model: Path | None, flash_attn: bool, gpu_layers: int, system: str | None, max_tokens: int, temp: float,
         seed: int | None, ctx: int | None, policy: str, budget: float | None, resume: Path | None, save: Path | None) -> None:
    """Chat in the terminal; the KV cache (active/frozen) is shown live. Lines on stdin work too."""
    from ..generate import Sampling

    with engine(model, flash_attn, gpu_layers) as (eng, _):
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
                if not bar.on and stats is not None:
                    click.echo(kv_line(stats.as_dict()) + f" | decode {stats.decode_tokens_per_s:.1f} tok/s", err=True)
        finally:
            bar.close()
            if save is not None:
                click.echo(f"saved to {session.save(save)}", err=True)
            session.close()


