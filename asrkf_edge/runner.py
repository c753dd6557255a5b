"""Runner: one generation's KV management. Sizes the session to the budget and wires a policy into it.

It folds captured attention into importance after every decode, asks the policy what to evict when
the cache is full, calls the policy's hooks (it is their :class:`~asrkf_edge.policies.PolicyContext`),
and re-decodes the newest token when a thaw changed the context its logits were computed from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .gather import RowGather
from .importance import Importance
from .llama import Model, cuda_graphs
from .policies import AsrKf, Policy, ScoringPolicy
from .policies.base import GGML_F16
from .policies.selection import lowest_groups
from .recall import Recall
from .session import KvStats, Session

log = logging.getLogger(__name__)


def budget_cells(policy: Policy, budget: float | None, prompt_tokens: int, max_new: int) -> int:
    """Cache cells for a generation: ``budget`` is a fraction of the prompt (<= 1.0) or a token count
    (> 1), honoured down to the policy's hard minimum. None means the policy's own budget, never below
    ``policy.min_cache``; unbounded policies, or no budget at all, get room for the whole context."""
    whole = prompt_tokens + max_new
    if not policy.bounded:
        return whole
    floor = policy.min_cells()
    if budget is None:
        budget, floor = policy.budget, max(floor, policy.min_cache)
        if budget is None:
            if not policy.reversible:
                raise ValueError(f"the {policy.name} policy drops what it evicts and needs a budget")
            return whole
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    tokens = int(budget * prompt_tokens) if budget <= 1.0 else int(budget)
    return min(whole, max(tokens, floor))


class Runner:
    """A session driven by a policy: prefill, decode one token at a time, stats."""

    def __init__(self, model: Model, policy: Policy, cells: int, *, flash_attn: bool = False, n_batch: int = 512,
                 store_dir: str | Path | None = None) -> None:
        if isinstance(policy, AsrKf) and policy.recalls and model.offloaded:
            log.info("recall lends rows through the cache's host memory: %s runs as asrkf with layers on a GPU", policy.name)
            policy = policy.without_recall()
        self.policy = policy
        self.step = 0
        self.stale_logits = False  # a thaw after the last decode: its logits miss the thawed tokens
        self._quiet = False  # re-reading at the policy's request: its after_decode is not called
        self.policy_seconds = 0.0  # in the policy's hooks and evictions, freezes and thaws included
        self.observe_seconds = 0.0  # folding captured attention into importance
        self._prompt_from: int | None = None  # logical tokens before the prompt being read
        type_v = policy.cache_type if policy.cache_type_v is None else policy.cache_type_v
        # llama.cpp refuses a quantized V cache without flash attention
        self._args = (model, cells, flash_attn or type_v != GGML_F16, n_batch, store_dir, policy.cache_type, type_v)
        self._start()

    def _start(self) -> None:
        """A fresh session and importance tracker for the policy: at the start, and for a prompt read again."""
        model, cells, flash_attn, n_batch, store_dir, type_k, type_v = self._args
        policy = self.policy
        self._importance: Importance | None = None
        if policy.attention is not None or policy.reversible:
            layers = policy.capture_layers(model.n_layer)
            fold = policy.fold_layers
            if model.offloaded and policy.gpu_fold_layers is not None:
                fold = policy.gpu_fold_layers  # where each decode is cut at the scored layers
            self._importance = Importance(model, layers, policy.window, flash_attn, decay=policy.attention == "ema",
                                          mirror_keys=policy.reversible, stride=policy.observe_every,
                                          keep_queries=policy.obs_window, fold_layers=fold)
        recalling = policy if isinstance(policy, AsrKf) and policy.recalls and self._importance is not None else None
        self.session = Session(
            model, cells, flash_attn=flash_attn, n_batch=n_batch, sinks=policy.sinks, recent=policy.recent,
            type_k=type_k, type_v=type_v,
            store_dir=store_dir, evict=self._evict if isinstance(policy, ScoringPolicy) else None,
            drop=not policy.reversible, shift=policy.shift,
            capture=self._importance.spec() if self._importance else None, on_decode=self._on_decode,
            before_decode=self._before_decode if self._importance else None,
            on_copy=self._importance.on_copy if self._importance else None,
            host_ops=recalling is not None,  # recall reads Qcur and writes the cache in host memory
            # with layers on a GPU the capture's callback makes each decode return only when the GPU is done: the
            # bookkeeping and the policy's hooks after a token's decode run beside it instead (Session._decode_beside).
            # Measured on CUDA only; its threads spin through a decode (llama.DECODE_SPIN_NS), which a laptop's Metal
            # GPU would pay for in power, unmeasured
            overlap=model.offloaded and self._importance is not None and cuda_graphs(),
        )
        if self._importance is not None:
            self._importance.capture = self.session.capture
            self._importance.fetch = self._fetch_keys
            if recalling is not None:
                self.session.recall = Recall(self.session, self._importance, recalling.recall,
                                             prompt_rows=recalling.recall_prompt_rows, ratio=recalling.recall_ratio,
                                             prompt_size=recalling.recall_prompt_size,
                                             prompt_tail=recalling.recall_prompt_tail, reply=recalling.recall_reply,
                                             reply_size=recalling.recall_reply_size)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # decoding
    def prefill(self, tokens: Sequence[int], final: bool = True, rest: int = 0) -> None:
        """Read the prompt (in chunks, evicting as the policy says); logits of its last token are ready.

        ``final=False``: more of the same prompt follows (the policy's end-of-prompt step waits for it), ``rest``
        tokens of it where the caller knows (recall reads a prompt's newest tokens with more care). A prompt
        read into an empty session is read a second time, from a fresh session, when the policy asks for it
        (:meth:`~asrkf_edge.policies.Policy.read_again`)."""
        if self._prompt_from is None:
            self._prompt_from = self.session.n_logical
        self._reserve(len(tokens) + rest)
        self.session.feed(tokens, rest=rest)
        if not final:
            return
        fresh, self._prompt_from = self._prompt_from == 0, None
        if fresh and self.policy.read_again(self):
            first, prompt = self.session, list(self.session.tokens)
            first.close()
            self._start()
            self.session.add_counts(first)
            self._reserve(len(prompt))
            self.session.feed(prompt)
        t0 = time.perf_counter()
        self.policy.after_prompt(self)
        self.policy_seconds += time.perf_counter() - t0
        self._settle()

    def _reserve(self, n: int) -> None:
        if self._importance is not None:  # room for the prompt and a reply (growing a 30-layer mirror copies it)
            self._importance.reserve(self.session.n_logical + n + 1024)

    def decode(self, token: int) -> None:
        """Append one generated token; logits of the next one are ready."""
        t0 = time.perf_counter()
        self.policy.before_token(self, token)
        self.policy_seconds += time.perf_counter() - t0
        self.session.feed([token])
        self._settle()

    def logits(self) -> np.ndarray:
        """Logits of the next token: a read-only view of llama.cpp's buffer, valid until the next decode."""
        return self.session.ctx.logits(copy=False)

    def redecode(self) -> None:
        """Decode the newest token again so its logits see the cache as it is now."""
        self.reread(1)

    def reread(self, n: int) -> None:
        """Decode the newest ``n`` tokens again so their KV and the next logits see the cache as it is now.

        llama.cpp continues a sequence from its highest cached position, so the token before them must be
        active: it is thawed first when it is not."""
        before = self.session.n_logical - n - 1
        if before >= 0 and self.session.store is not None and self.session.store.is_frozen(np.array([before]))[0]:
            self.session.thaw_positions(np.array([before]))
        self.stale_logits = False
        self._quiet = True
        try:
            tokens = self.session.rewind(n)
            # with recall, in decodes it lends rows to, each query its own (the bench's multi-turn at 4k: 3 -> 4 of
            # 10, 1k: 8 -> 9, full 6 and 9); asrkf's question with its reply's recall on too (4k case 4, "purple",
            # lost at 0.35 when read again as one chunk of the prompt's recall, answered this way)
            recall = self.session.recall
            step = recall.max_rows if recall is not None and recall.usable and recall.in_short_decodes else len(tokens)
            for i in range(0, len(tokens), step):
                self.session.feed(tokens[i : i + step])
        finally:
            self._quiet = False

    def _settle(self) -> None:
        if self.stale_logits:
            self.redecode()
        t0 = time.perf_counter()
        self.policy.after_logits(self)
        self.policy_seconds += time.perf_counter() - t0

    # the policy's view (PolicyContext)
    @property
    def n_logical(self) -> int:
        return self.session.n_logical

    @property
    def n_frozen(self) -> int:
        return self.session.n_frozen

    @property
    def budget(self) -> int:
        return self.session.budget

    @property
    def importance(self) -> Importance:
        if self._importance is None:
            raise AttributeError(f"the {self.policy.name} policy observes no attention")
        return self._importance

    def free_cells(self) -> int:
        return self.session.free_cells()

    def tokens(self, start: int, stop: int) -> list[int]:
        return self.session.tokens[start:stop]

    def active(self) -> np.ndarray:
        return self.session.active_positions()

    def frozen(self) -> np.ndarray:
        return self.session.frozen_positions()

    def protected(self, positions: np.ndarray) -> np.ndarray:
        return self.session.protected(positions)

    def freeze(self, positions: np.ndarray) -> int:
        return self.session.freeze_positions(positions)

    def thaw(self, positions: np.ndarray, redecode: bool = True) -> int:
        n = self.session.thaw_positions(positions, packed=True)
        if n and redecode:
            self.stale_logits = True
        return n

    # hooks the session calls
    def _before_decode(self, session: Session, pos0: int, n: int) -> None:
        assert self._importance is not None and session.capture is not None
        self._importance.flush()
        session.capture.enabled = self._importance.wants(pos0, n)
        session.capture.split = self._importance.split and n == 1

    def _on_decode(self, session: Session, pos0: int, n: int) -> None:
        t0 = time.perf_counter()
        self.step += not self._quiet  # a step is a token read, not one read again
        if self._importance is not None:
            self._importance.observe(session.cell_positions, pos0, n, fold_scores=not self._quiet)
        t1 = time.perf_counter()
        self.observe_seconds += t1 - t0
        if not self._quiet:
            self.policy.after_decode(self, pos0, n)
        self.policy_seconds += time.perf_counter() - t0

    def _fetch_keys(self, positions: np.ndarray) -> None:
        """Keys the mirror lacks, gathered from llama.cpp's K cache on its device (:meth:`Session.read_keys`), or
        with a peek (K and V through the scratch sequence) until the cache's tensors are known or where the device
        cannot gather. Measured: on an H100 (LLaMA-3-8B shape, 4k-16k) a peek of the 7-8 tokens decoded since the
        last observation took 2.3 ms, 0.22-0.37 ms a decoded token; on 2 EPYC cores (default model) the gather of
        8 / 60 scattered cells took 0.03 / 0.09 ms against a peek's 0.22 / 0.84 (benchmarks/device_gather.py)."""
        assert self._importance is not None
        for a in range(0, len(positions), RowGather.MAX_CELLS):  # parts the gather's reused buffer holds
            part = positions[a : a + RowGather.MAX_CELLS]
            got = self.session.read_keys(part)
            if got is None:
                self.session.peek(part)  # on_copy fills the mirror
            else:
                self._importance.on_keys(*got)

    def _evict(self, session: Session, need: int, batch: int, candidates: np.ndarray) -> np.ndarray:
        """The lowest-scoring candidates; beyond ``need``, none the policy scores as infinite (pinned). With
        the policy's ``evict_cells`` above 1, the candidates in each group of that many cells leave together,
        groups ranked by their best score."""
        assert isinstance(self.policy, ScoringPolicy)
        scores = self.policy.score(self, candidates)
        if self.policy.evict_cells > 1:
            chosen = candidates[lowest_groups(scores, session.cells_of(candidates) // self.policy.evict_cells, need, batch)]
        else:
            order = np.argsort(scores, kind="stable")
            extra = order[need:batch]
            chosen = candidates[np.concatenate([order[:need], extra[np.isfinite(scores[extra])]])]
        self.policy.on_evict(self, chosen)
        return chosen

    def stats(self) -> KvStats:
        """The session's :class:`KvStats` with the policy, budget, recoveries and time spent deciding."""
        log = self.policy.recovery_log()
        return dataclasses.replace(
            self.session.kv_stats(),
            policy=self.policy.name,
            budget_tokens=self.session.budget if self.policy.bounded else None,
            recoveries=len(log),
            recovery_log=tuple(log),
            policy_seconds=self.policy_seconds,
            observe_seconds=self.observe_seconds,
            key_mirror_bytes=self._importance.mirror_bytes if self._importance else 0,
        )

    # saving and resuming
    def state(self) -> dict[str, Any]:
        """Counters, the session (KV included), importance and the policy's runtime state (once the policy has
        finished what it runs in the background, which may change the KV)."""
        self.policy.finish(self)
        return {"step": self.step, "stale_logits": self.stale_logits, "policy_seconds": self.policy_seconds,
                "observe_seconds": self.observe_seconds, "session": self.session.state(),
                "importance": self._importance.state(self.session.n_logical) if self._importance else None,
                "policy": self.policy.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state` into a fresh runner made with the same model, policy and cells."""
        self.session.load_state(state["session"])
        if self._importance is not None and state["importance"] is not None:
            self._importance.load_state(state["importance"])
        self.policy.load_state(state["policy"])
        self.step, self.stale_logits = int(state["step"]), bool(state["stale_logits"])
        self.policy_seconds, self.observe_seconds = float(state["policy_seconds"]), float(state["observe_seconds"])
