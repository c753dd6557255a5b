"""Exceptions that asrkf-edge raises: each carries a one-line message fit for a user."""

from __future__ import annotations


class AsrkfError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""


class ModelError(AsrkfError):
    """The model file is missing, not GGUF, truncated, or of an unsupported architecture."""


class PromptTooLongError(AsrkfError):
    """The prompt does not fit in the context the session may reach."""


class OutOfCellsError(AsrkfError):
    """The bounded KV cache has no room and nothing more can be frozen to make some."""


class StoreError(AsrkfError):
    """The frozen-KV store failed: a write (disk full) or a read (missing or corrupt segment)."""


class LlamaError(AsrkfError):
    """llama.cpp reported a failure (decode, state copy, context creation)."""


class SessionFileError(AsrkfError):
    """A saved chat cannot be resumed: another model, another format version, or a damaged file."""
