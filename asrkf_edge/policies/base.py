"""The policy protocol, the registry of policies by name, and ``full`` (the policy that does nothing).

A policy is a small dataclass, like a kvpress "press": a :class:`ScoringPolicy` has a :meth:`~ScoringPolicy.score`
(higher = keep) and the runner evicts the lowest-scoring unprotected tokens when the cache is full; a plain
:class:`Policy` never chooses tokens (it keeps everything, or shifts like llama.cpp). Reversible policies
freeze what leaves (it can come back); the others drop it. Hooks see a :class:`PolicyContext`: what a policy
may read and ask for, never the runner's fields. Subclasses register under their ``name`` when defined.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from ..blob import GGML_F16, GGML_Q4_0, GGML_Q8_0  # noqa: F401  (cache types; re-exported to the policies)

if TYPE_CHECKING:
    from ..importance import Importance

Attention = Literal["ema", "sum"] | None


_REGISTRY: dict[str, type[Policy]] = {}


class PolicyContext(Protocol):
    """What a policy may read and ask for during one generation (the :class:`~asrkf_edge.runner.Runner`)."""

    @property
    def step(self) -> int:
        """Decodes so far (prefill chunks included)."""

    @property
    def n_logical(self) -> int:
        """Tokens of the logical context, active and frozen."""

    @property
    def n_frozen(self) -> int:
        """Tokens in the frozen store."""

    @property
    def budget(self) -> int:
        """Cells the cache may hold."""

    @property
    def importance(self) -> Importance:
        """Scores, captured queries and key mirror (policies with ``attention`` or ``reversible`` only)."""

    def free_cells(self) -> int: ...

    def tokens(self, start: int, stop: int) -> list[int]:
        """Token ids of positions ``start`` to ``stop`` (exclusive)."""

    def active(self) -> np.ndarray:
        """Positions in the cache, sorted."""

    def frozen(self) -> np.ndarray:
        """Positions in the frozen store, sorted."""

    def protected(self, positions: np.ndarray) -> np.ndarray:
        """Mask of positions that must stay active (sinks and the recent window)."""

    def logits(self) -> np.ndarray:
        """Logits of the next token as the newest decode left them (read-only, valid until the next decode)."""

    def freeze(self, positions: np.ndarray) -> int:
        """Move these active positions to the store (protected ones stay); returns how many moved."""

    def thaw(self, positions: np.ndarray, redecode: bool = True) -> int:
        """Bring these frozen positions back, into the first free cells (``Session.thaw_positions(packed=True)``);
        returns how many came back. With ``redecode`` the newest token is decoded again before its logits are
        used (they were computed without what came back)."""

    def redecode(self) -> None:
        """Decode the newest token again now, so its logits see the cache as it is."""

    def reread(self, n: int) -> None:
        """Decode the newest ``n`` tokens again now (they must be active): their KV and the next logits then
        see the cache as it is. The policy's ``after_decode`` is not called for them."""


def default_layers(n_layer: int, count: int = 8) -> tuple[int, ...]:
    """``count`` evenly spaced layers, skipping layer 0 (its attention is mostly positional)."""
    lo = 1 if n_layer > 1 else 0
    return tuple(sorted({int(round(x)) for x in np.linspace(lo, n_layer - 1, min(count, n_layer))}))


@dataclass
class Policy:
    """Base of every policy: protected sizes, what attention it needs, and the hooks the runner calls.

    sinks, recent: first and newest tokens never evicted. window: queries observed per decode (and the
    horizon of the decayed score). layers: layers whose attention is captured (None: 8 evenly spaced).
    observe_every: with flash attention (attention computed on the host), decode steps per observation.
    fold_layers: how many of the captured layers (evenly spaced) the decayed score, the re-evaluation and the
    recovery check read; with the layers on a GPU, also the nodes every decode is cut at. gpu_fold_layers: the
    same with the layers on a GPU (None: ``fold_layers``).
    """

    name: ClassVar[str] = ""
    reversible: ClassVar[bool] = False
    attention: ClassVar[Attention] = None
    bounded: ClassVar[bool] = True  # False: the cache holds the whole context, budget ignored
    cache_type: ClassVar[int] = GGML_F16  # K cache type, V's too unless cache_type_v; quantized V needs flash attention
    cache_type_v: ClassVar[int | None] = None  # the V cache's type where it differs from K's (None: ``cache_type``)
    shift: ClassVar[bool] = False  # when full: drop the older half after the sinks and renumber (llama.cpp)
    bench_only: ClassVar[bool] = False  # a yardstick for the bench (the oracle), not offered to users

    sinks: int = 4
    recent: int = 16
    window: int = 32
    layers: tuple[int, ...] | None = None
    observe_every: int = 4
    fold_layers: int = 8
    gpu_fold_layers: int | None = None
    obs_window: int = 0  # query rows kept across decodes for scoring at question time (0: none)
    budget: float | None = None  # used when generate() gets none: fraction of the prompt or tokens
    min_cache: int = 512  # the policy's own budget never shrinks the cache below this many tokens

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            _REGISTRY[cls.name] = cls

    def capture_layers(self, n_layer: int) -> tuple[int, ...]:
        """Layers whose attention is captured and scored."""
        return self.layers or default_layers(n_layer)

    def min_cells(self) -> int:
        """Smallest cache this policy can run with."""
        return self.sinks + self.recent + 32

    def after_decode(self, ctx: PolicyContext, pos0: int, n: int) -> None:
        """Called after every decode (prefill chunks included), attention already folded in."""

    def read_again(self, ctx: PolicyContext) -> bool:
        """Called when a prompt read into an empty session is complete, before :meth:`after_prompt`: True has the
        runner read it again into a fresh session (the policy keeps what it learned from this read)."""
        return False

    def after_prompt(self, ctx: PolicyContext) -> None:
        """Called when a whole prompt (or a chat turn's new text) has been read, before its logits are used."""

    def before_token(self, ctx: PolicyContext, token: int) -> None:
        """Called before a generated (or teacher-forced) token is decoded, with its id."""

    def after_logits(self, ctx: PolicyContext) -> None:
        """Called once the logits of the next token are final (after prefill and after each token)."""

    def on_evict(self, ctx: PolicyContext, positions: np.ndarray) -> None:
        """Called with the positions about to leave the cache because it is full."""

    def finish(self, ctx: PolicyContext) -> None:
        """Complete what the policy left running in the background (before its runner's state is saved)."""

    def config(self) -> dict[str, Any]:
        """The settings (init fields) as JSON values: nested dataclasses as dicts, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.init:
                v = getattr(self, f.name)
                out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Policy:
        """The policy :meth:`config` describes (settings this version lacks are an error)."""
        base = cls()
        kw: dict[str, Any] = {}
        for key, value in config.items():
            default = getattr(base, key, None)
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                kw[key] = type(default)(**value)
            else:
                kw[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kw)

    def recovery_log(self) -> list[dict[str, object]]:
        """The recoveries this policy made so far, one dict each (for the run's stats)."""
        return []

    def state(self) -> dict[str, Any]:
        """Runtime state (not configuration) to save with a chat: arrays and JSON values."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` gave."""


@dataclass
class ScoringPolicy(Policy):
    """A policy that chooses which tokens leave: the runner evicts the lowest :meth:`score` first.

    ``evict_cells``: tokens leave in groups of that many neighbouring cache cells, ranked by their best token,
    so the cells they free form runs and what lands there later is uploaded in few copies (1: token by token)."""

    evict_cells: int = 1

    def score(self, ctx: PolicyContext, positions: np.ndarray) -> np.ndarray:
        """Importance of candidate positions; the lowest leave first (inf: never beyond what is needed)."""
        raise NotImplementedError


@dataclass
class Full(Policy):
    """Plain llama.cpp: every token stays in the cache."""

    name: ClassVar[str] = "full"
    bounded: ClassVar[bool] = False


def policy_names(bench: bool = False) -> tuple[str, ...]:
    """The registered policies in the order the package defines them (the order of tables and choices);
    ``bench``: with the bench's yardsticks (the oracle)."""
    return tuple(k for k, v in _REGISTRY.items() if bench or not v.bench_only)


def policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_policy(name: str, **overrides: Any) -> Policy:
    """A fresh policy by name (one of :func:`policy_names`) with fields overridden; a field that holds a dataclass
    (asrkf's entropy rule, its schedule) also takes a dict of the fields to change in it (the benchmarks' JSON)."""
    cls = policy_class(name)
    nested = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in nested:
            overrides[key] = dataclasses.replace(nested[key](), **value)
    return cls(**overrides)
