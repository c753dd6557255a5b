"""asrkf-edge: run GGUF LLaMA-family models through llama.cpp with a small active KV cache.

Public API: :class:`Engine` (one model), :class:`Chat` (a conversation with its own KV), :class:`Session` (one
logical context with freeze/thaw), and the KV policies (:func:`policy_names` lists them; :class:`AsrKf` is ours).
"""

from . import llama  # noqa: F401  (first: a CUDA build of llama.cpp crashes when NumPy/Numba load before it)
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
from .generate import GenerationStats, Sampling
from .policies import (
    H2O,
    AsrKf,
    ContextShift,
    EntropyRule,
    Full,
    Policy,
    Q4Cache,
    Q8Cache,
    Schedule,
    Streaming,
    make_policy,
    policy_names,
)
from .session import KvStats, Session

__all__ = [
    "__version__",
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
    "policy_names",
    "GenerationStats",
    "KvStats",
    "Sampling",
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
from .version import __version__
