"""``python -m asrkf_edge.cli``: the same as the ``asrkf-edge`` command."""

from . import main

main()
