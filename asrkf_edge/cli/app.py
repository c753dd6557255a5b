"""The ``asrkf-edge`` command group; each command module adds itself to it."""

from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv: llama.cpp's own log).")
def main(verbose: int) -> None:
    """asrkf-edge: local GGUF models with a small active KV cache (ASR-KF-EGR)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
