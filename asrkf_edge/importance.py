"""Token importance from the model's own attention: Numba kernels, their NumPy references, the tracker.

Importance of a token is the attention mass it receives from the queries of a sliding observation
window, averaged over heads and the scored layers and decayed over time (an exponential moving average
over query rows, so the newest ~``window`` queries dominate). With flash attention off the mass comes
from llama.cpp's own softmax (``kq_soft_max``, exact, per KV cell); with it on, it is computed here from
the captured post-RoPE queries and a mirror of the keys (the same f16 rows the cache and store hold).
"""

from __future__ import annotations

import numba
import numpy as np

from .capture import Capture, CaptureSpec
from .llama import Model

_JIT = {"cache": True, "nogil": True, "fastmath": False}


# kernels -----------------------------------------------------------------------------------------


def attention_mass(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float,
                   parallel: bool = False) -> np.ndarray:
    """Causal softmax attention of queries over mirrored keys, averaged over layers and heads.

    q [L, R, H, d] float32; keys [L, P, Hkv, d] float16 bits (uint16), indexed by position; qpos [R], kpos [N]
    (positions of the keys attended; a key is visible to a query when kpos <= qpos). Returns mass [R, N]:
    each row sums to 1 over visible keys. Each key row is decoded once and shared by its query heads (GQA).
    ``parallel`` spreads (layer, KV head) pairs over Numba's threads: worth it only when llama.cpp's own
    threads are idle (layers on a GPU); on a CPU backend the two thread pools fight and serial is faster.
    """
    args = (np.ascontiguousarray(q, np.float32), qpos, keys, kpos, np.float32(scale))
    return _mass_parallel(*args) if parallel else _mass_serial(*args)


@numba.njit(**_JIT)
def _mass_serial(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32) -> np.ndarray:
    n_l, n_kv = q.shape[0], keys.shape[2]
    out = np.zeros((q.shape[1], len(kpos)), np.float32)
    for t in range(n_l * n_kv):
        _head_mass(q, qpos, keys, kpos, scale, t // n_kv, t % n_kv, out)
    return out / (n_l * q.shape[2])


@numba.njit(parallel=True, **_JIT)
def _mass_parallel(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32) -> np.ndarray:
    n_l, n_kv = q.shape[0], keys.shape[2]
    parts = np.zeros((n_l * n_kv, q.shape[1], len(kpos)), np.float32)
    for t in numba.prange(n_l * n_kv):
        _head_mass(q, qpos, keys, kpos, scale, t // n_kv, t % n_kv, parts[t])
    return parts.sum(axis=0) / (n_l * q.shape[2])


# 2**112: rescales a float16's exponent and mantissa bits, shifted into a float32, to the float16's value
_F16_RESCALE = np.float32(2.0**112)


@numba.njit(**_JIT)
def f16_to_f32(src: np.ndarray, bits: np.ndarray) -> None:
    """float16 bit patterns ``src`` into float32 bit patterns ``bits`` (Numba has no float16 type): shift
    exponent and mantissa into place, rescale (normals and subnormals alike), fix inf/nan, set the sign."""
    row = bits.view(np.float32)
    for e in range(len(src)):
        bits[e] = (np.uint32(src[e]) & np.uint32(0x7FFF)) << np.uint32(13)
    for e in range(len(src)):
        x = row[e] * _F16_RESCALE
        if x >= np.float32(65536.0):
            x = np.float32(np.inf) if src[e] & 0x3FF == 0 else np.float32(np.nan)
        row[e] = -x if src[e] & 0x8000 else x


# reassociation lets LLVM vectorize the dot products (the NumPy twin agrees to ~1e-9)
@numba.njit(**{**_JIT, "fastmath": {"reassoc", "contract"}})
def _head_mass(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32,
               layer: int, kh: int, out: np.ndarray) -> None:
    """Add one layer's KV head's softmax rows (its ``group`` query heads) into ``out`` [R, N]."""
    n_r, n_h, d = q.shape[1], q.shape[2], q.shape[3]
    group = n_h // keys.shape[2]
    n, m = len(kpos), group * n_r
    qs = np.empty((m, d), np.float32)
    for i in range(m):
        for e in range(d):
            qs[i, e] = q[layer, i % n_r, kh * group + i // n_r, e] * scale
    logit = np.empty((m, n), np.float32)
    bits = np.empty(d, np.uint32)
    row = bits.view(np.float32)
    for j in range(n):
        f16_to_f32(keys[layer, kpos[j], kh], bits)
        for i in range(m):
            acc = np.float32(0.0)
            for e in range(d):
                acc += qs[i, e] * row[e]
            logit[i, j] = acc
    for i in range(m):
        r = i % n_r
        top = np.float32(-np.inf)
        for j in range(n):
            if kpos[j] <= qpos[r] and logit[i, j] > top:
                top = logit[i, j]
        total = np.float32(0.0)
        for j in range(n):
            x = np.exp(logit[i, j] - top) if kpos[j] <= qpos[r] else np.float32(0.0)
            logit[i, j] = x
            total += x
        inv = np.float32(1.0) / total
        for j in range(n):
            out[r, j] += logit[i, j] * inv


def attention_mass_reference(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float) -> np.ndarray:
    """NumPy twin of :func:`attention_mass`."""
    k = keys[:, kpos].view(np.float16).astype(np.float64)  # [L, N, Hkv, d]
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)  # [L, N, H, d]
    logits = np.einsum("lrhd,lnhd->lrhn", q.astype(np.float64), k) * scale
    visible = kpos[None, :] <= qpos[:, None]  # [R, N]
    logits = np.where(visible[None, :, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=(0, 2)).astype(np.float32)


@numba.njit(**_JIT)
def fold(scores: np.ndarray, mass: np.ndarray, kpos: np.ndarray, qpos: np.ndarray, gamma: float, weight: float) -> None:
    """Fold attention rows into per-position scores in query order: s = gamma * s + weight * mass.

    mass [R, N] over keys at positions kpos (-1: no token); only keys a query can see are touched.
    """
    for r in range(mass.shape[0]):
        for j in range(mass.shape[1]):
            p = kpos[j]
            if p >= 0 and p <= qpos[r]:
                scores[p] = gamma * scores[p] + weight * mass[r, j]


def fold_reference(scores: np.ndarray, mass: np.ndarray, kpos: np.ndarray, qpos: np.ndarray, gamma: float, weight: float) -> None:
    """NumPy twin of :func:`fold`."""
    for r in range(mass.shape[0]):
        seen = (kpos >= 0) & (kpos <= qpos[r])
        p = kpos[seen]
        scores[p] = np.float32(gamma) * scores[p] + np.float32(weight) * mass[r, seen]


@numba.njit(**_JIT)
def entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits)."""
    top = -np.inf
    for x in logits:
        if x > top:
            top = x
    z = 0.0
    s = 0.0
    for x in logits:
        e = np.exp(x - top)
        z += e
        s += e * (x - top)
    return np.log(z) - s / z


def entropy_reference(logits: np.ndarray) -> float:
    """NumPy twin of :func:`entropy`."""
    x = logits.astype(np.float64) - logits.max()
    p = np.exp(x) / np.exp(x).sum()
    return float(-(p * np.log(np.where(p > 0, p, 1.0))).sum())


# tracker -----------------------------------------------------------------------------------------


class Importance:
    """Per-position importance scores and key mirror, updated after every decode of a session.

    ``gamma``/``weight`` choose the fold: an EMA over the window (ASR-KF) or a plain running sum (H2O).
    ``stride``: with flash attention, host attention is computed for one decode step in ``stride`` (the cost
    of scoring grows with the active keys; the softmax captured without flash attention is folded every step).
    ``mirror_keys`` keeps the post-RoPE keys of the scored layers (f16, by position) for scoring frozen
    tokens against new queries and for flash attention; without it only ``kq_soft_max`` is used.
    """

    def __init__(self, model: Model, layers: tuple[int, ...], window: int, flash_attn: bool,
                 decay: bool = True, mirror_keys: bool = True, stride: int = 1) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.model = model
        self.stride = stride if flash_attn else 1  # the captured softmax costs nothing to fold: every step
        self.layers = layers
        self.window = window
        self.flash_attn = flash_attn
        self.gamma, self.weight = (1.0 - 1.0 / window, 1.0 / window) if decay else (1.0, 1.0)
        self.mirror_keys = mirror_keys or flash_attn
        self.scale = 1.0 / float(np.sqrt(model.head_dim))
        self.parallel = model.n_gpu_layers != 0  # the CPU cores idle while the GPU decodes: score on all of them
        self.scores = np.zeros(1024, np.float32)
        self._kv = model.n_head_kv * model.head_dim
        self.keys = np.zeros((len(layers), 1024 if self.mirror_keys else 0, self._kv), np.float16)
        self.capture: Capture | None = None

    def spec(self) -> CaptureSpec:
        """What the session's capture must copy for this tracker."""
        return CaptureSpec(self.layers, self.window, probs=not self.flash_attn, queries=self.mirror_keys, keys=self.mirror_keys)

    @property
    def mirror_bytes(self) -> int:
        return int(self.keys.nbytes)

    def _grow(self, n: int) -> None:
        if n > len(self.scores):
            cap = max(n, 2 * len(self.scores))
            self.scores = np.concatenate([self.scores, np.zeros(cap - len(self.scores), np.float32)])
            if self.mirror_keys:
                more = np.zeros((len(self.layers), cap - self.keys.shape[1], self._kv), np.float16)
                self.keys = np.concatenate([self.keys, more], axis=1)

    def observe(self, cell_pos: np.ndarray, pos0: int, n: int) -> None:
        """Fold the last decode (positions pos0..pos0+n-1) into the scores; ``cell_pos`` maps cells to
        positions of sequence 0 (-1 elsewhere). New tokens start at the uniform share 1/logical tokens."""
        cap = self.capture
        assert cap is not None
        self._grow(pos0 + n)
        active = cell_pos[cell_pos >= 0]
        self.scores[pos0 : pos0 + n] = 1.0 / (pos0 + n)
        if self.mirror_keys:
            for i, layer in enumerate(self.layers):
                k = cap.keys(layer)
                if k is not None:
                    self.keys[i, pos0 : pos0 + n] = k.reshape(n, -1)
        rows = min(n, self.window)
        qpos = np.arange(pos0 + n - rows, pos0 + n, dtype=np.int64)
        gamma, weight = self.gamma, self.weight
        if n == 1 and self.stride > 1:  # one query in ``stride`` stands for them all: same steady state
            if pos0 % self.stride:
                return
            gamma, weight = self.gamma**self.stride, self.weight * sum(self.gamma**i for i in range(self.stride))
        if not self.flash_attn:
            probs = [p for layer in self.layers if (p := cap.probs(layer)) is not None]
            if not probs:
                return
            mass = np.mean([p.mean(axis=0) for p in probs], axis=0)  # [rows, n_kv]
            kpos = cell_pos[: mass.shape[1]]
        else:
            kpos = np.sort(active)
            mass = self.mass(self.queries(), qpos, kpos)
        fold(self.scores, np.ascontiguousarray(mass, np.float32), kpos.astype(np.int64), qpos, gamma, weight)

    def of(self, positions: np.ndarray) -> np.ndarray:
        """Scores of ``positions`` (float64)."""
        return self.scores[positions].astype(np.float64)

    def state(self, n: int) -> dict[str, np.ndarray]:
        """Scores and mirrored keys of the first ``n`` positions."""
        out = {"scores": self.scores[:n].copy()}
        if self.mirror_keys:
            out["keys"] = self.keys[:, :n].copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        n = len(state["scores"])
        self._grow(n)
        self.scores[:n] = state["scores"]
        if self.mirror_keys and "keys" in state:
            self.keys[:, :n] = state["keys"]

    def queries(self) -> np.ndarray:
        """The last decode's newest queries, [L, rows, H, d]."""
        cap = self.capture
        assert cap is not None
        return np.stack([cap.queries(layer) for layer in self.layers])

    def mirror(self) -> np.ndarray:
        """The key mirror as the kernels take it: [L, positions, Hkv, d] float16 bits."""
        return self.keys.view(np.uint16).reshape(len(self.layers), -1, self.model.n_head_kv, self.model.head_dim)

    def mass(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray) -> np.ndarray:
        """Attention mass [rows, len(kpos)] that queries ``q`` give the mirrored keys at ``kpos``."""
        return attention_mass(q, qpos, self.mirror(), kpos.astype(np.int64), self.scale, self.parallel)
