"""``asrkf-edge`` command line: one module per command (:mod:`.run`, :mod:`.chat`, :mod:`.serve`, :mod:`.bench`,
:mod:`.models`) on the group in :mod:`.app`, with the options they share in :mod:`.options`. A new command is a
module here that decorates a function with ``@main.command()``, imported below."""

from . import bench, chat, models, run, serve  # noqa: F401  (each registers its command on main)
from .app import main

__all__ = ["main"]
