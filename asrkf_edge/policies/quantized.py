"""llama.cpp's own memory savers: the whole context in a quantized KV cache (``--cache-type-k/v``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import GGML_Q4_0, GGML_Q8_0, Full


@dataclass
class Q8Cache(Full):
    """``--cache-type-k/v q8_0``: the whole context, K and V rows quantized to 8 bits."""

    name: ClassVar[str] = "q8_0"
    cache_type: ClassVar[int] = GGML_Q8_0


@dataclass
class Q4Cache(Full):
    """The same with 4-bit rows (``q4_0``)."""

    name: ClassVar[str] = "q4_0"
    cache_type: ClassVar[int] = GGML_Q4_0
