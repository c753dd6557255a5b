"""asrkf-edge: run GGUF LLaMA-family models through llama.cpp with a small active KV cache.

Public API: :class:`Engine` (one model), :class:`Session` (one logical context with freeze/thaw), and
the KV policies (:class:`AsrKf`, :class:`Full`, :class:`Streaming`, :class:`H2O`).
"""

from . import llama  # noqa: F401  (first: a CUDA build of llama.cpp crashes when NumPy/Numba load before it)
from .asrkf import AsrKf
from .chat import Chat
from .engine import Engine, GenerationResult
from .errors import (
    AsrkfError,
    LlamaError,
    ModelError,
    OutOfCellsError,
    PromptTooLongError,
    SessionFileError,
    StoreError,
)
from .policy import H2O, ContextShift, Full, Policy, Q4Cache, Q8Cache, Streaming, make_policy
from .recovery import EntropyRule
from .schedule import Schedule
from .session import Session

__all__ = [
    "H2O",
    "AsrKf",
    "AsrkfError",
    "Chat",
    "ContextShift",
    "EntropyRule",
    "Full",
    "Policy",
    "Q4Cache",
    "Q8Cache",
    "Schedule",
    "Streaming",
    "make_policy",
    "Engine",
    "GenerationResult",
    "LlamaError",
    "ModelError",
    "OutOfCellsError",
    "PromptTooLongError",
    "Session",
    "SessionFileError",
    "StoreError",
]
__version__ = "0.1.0"
