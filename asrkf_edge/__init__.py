"""asrkf-edge: run GGUF LLaMA-family models through llama.cpp with a small active KV cache.

Public API: :class:`Engine` (one model), :class:`Session` (one logical context with freeze/thaw).
"""

from .engine import Engine, GenerationResult
from .errors import AsrkfError, LlamaError, ModelError, OutOfCellsError, PromptTooLongError, StoreError
from .session import Session

__all__ = [
    "AsrkfError",
    "Engine",
    "GenerationResult",
    "LlamaError",
    "ModelError",
    "OutOfCellsError",
    "PromptTooLongError",
    "Session",
    "StoreError",
]
__version__ = "0.1.0"
