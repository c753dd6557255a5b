"""Token importance from the model's own attention: Numba kernels, their NumPy references, the tracker.

Importance of a token is the attention mass it receives from the queries of a sliding observation
window, averaged over heads and the scored layers and decayed over time (an exponential moving average
over query rows, so the newest ~``window`` queries dominate). With flash attention off the mass comes
from llama.cpp's own softmax (``kq_soft_max``, exact, per KV cell); with it on, it is computed here from
the captured post-RoPE queries and a mirror of the keys (the same f16 rows the cache and store hold).
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import TypeVar

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import pages
from .blob import GGML_F16, Parsed, rows_as_f16
from .capture import Capture, CaptureSpec
from .llama import Model, cuda_graphs

T = TypeVar("T")

_JIT = {"cache": True, "nogil": True, "fastmath": False}


# kernels -----------------------------------------------------------------------------------------


def attention_mass(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float,
                   parallel: bool = False, layers: np.ndarray | None = None) -> np.ndarray:
    """Causal softmax attention of queries over mirrored keys, averaged over layers and heads.

    q [L, R, H, d] float32; keys [Lk, P, Hkv, d] float16 bits (uint16), indexed by position; qpos [R], kpos [N]
    (positions of the keys attended; a key is visible to a query when kpos <= qpos); ``layers`` [L]: the key
    layer of each query layer (default: the same index), so that a few layers are scored without copying them
    out of the mirror (a copy of 8 of 30 layers cost ~3 ms per call at 2k). Returns mass [R, N]: each row
    sums to 1 over visible keys. Each key row is decoded once and shared by its query heads (GQA).
    ``parallel`` spreads (layer, KV head) pairs over Numba's threads: worth it only when llama.cpp's own
    threads are idle (layers on a GPU); on a CPU backend the two thread pools fight and serial is faster.
    """
    q, lay = np.ascontiguousarray(q, np.float32), _key_layers(q, layers)
    m, n = (q.shape[2] // keys.shape[2]) * q.shape[1], len(kpos)
    if not parallel:
        return _mass_serial(q, qpos, keys, kpos, np.float32(scale), lay, _workspace(m * n))
    g = _groups(len(lay) * keys.shape[2])
    return _mass_parallel(q, qpos, keys, kpos, np.float32(scale), lay, _workspace(g * (m + q.shape[1]) * n), g)


def _key_layers(q: np.ndarray, layers: np.ndarray | None) -> np.ndarray:
    return np.arange(q.shape[0], dtype=np.int64) if layers is None else np.asarray(layers, np.int64)


def _groups(tasks: int) -> int:
    """Groups the parallel kernels split their (layer, KV head) tasks into: one per Numba thread."""
    return max(1, min(tasks, numba.get_num_threads()))


_WORK = threading.local()
_WORK_KEPT = 128 << 20  # bytes of scratch a thread keeps between calls; a larger need is met once and let go


def _workspace(size: int) -> np.ndarray:
    """Float32 scratch of ``size`` elements, the calling thread's own and reused from call to call. The kernels took
    fresh arrays per call and per (layer, KV head) task, each a run of first-touch page faults (the seventh session
    saw such faults double a decode on an H200's host): the parallel re-evaluation (8 rows, 32k keys, default
    shape) took 1,980 minor faults a call, the 8B shape's at 16k 680; now none (benchmarks/scoring_speed.py's shapes,
    2-core EPYC)."""
    if size * 4 > _WORK_KEPT:
        return np.empty(size, np.float32)
    buf = getattr(_WORK, "buf", None)
    if buf is None or len(buf) < size:
        grown = 2 * (0 if buf is None else len(buf))
        buf = _WORK.buf = np.empty(max(size, min(grown, _WORK_KEPT // 4)), np.float32)
    return buf


@numba.njit(**_JIT)
def _mass_serial(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32,
                 layers: np.ndarray, work: np.ndarray) -> np.ndarray:
    n_l, n_kv, n_r = q.shape[0], keys.shape[2], q.shape[1]
    out = np.zeros((n_r, len(kpos)), np.float32)
    for t in range(n_l * n_kv):
        p = _head_softmax(q, qpos, keys, kpos, scale, t // n_kv, layers[t // n_kv], t % n_kv, work)
        for i in range(p.shape[0]):
            out[i % n_r] += p[i]
    out /= n_l * q.shape[2]
    return out


@numba.njit(parallel=True, **_JIT)
def _mass_parallel(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32,
                   layers: np.ndarray, work: np.ndarray, groups: int) -> np.ndarray:
    """Group g takes tasks g, g + groups, ... in its own slice of ``work``: softmax rows, then its partial sum."""
    n_l, n_kv, n_r, n = q.shape[0], keys.shape[2], q.shape[1], len(kpos)
    m = (q.shape[2] // n_kv) * n_r
    span = (m + n_r) * n
    for g in numba.prange(groups):
        mine = work[g * span : (g + 1) * span]
        part = mine[m * n :].reshape((n_r, n))
        part[:] = 0.0
        for t in range(g, n_l * n_kv, groups):
            p = _head_softmax(q, qpos, keys, kpos, scale, t // n_kv, layers[t // n_kv], t % n_kv, mine)
            for i in range(p.shape[0]):
                part[i % n_r] += p[i]
    out = np.zeros((n_r, n), np.float32)
    for g in range(groups):
        out += work[g * span + m * n : (g + 1) * span].reshape((n_r, n))
    out /= n_l * q.shape[2]
    return out


def head_scores(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float,
                parallel: bool = False) -> np.ndarray:
    """Attention each query head gives each key, summed over the query rows: [L * H, N] (row l * H + h).

    The observation-window score of SnapKV, kept per head so that heads can be pooled and combined as a
    policy chooses. Arguments as for :func:`attention_mass`.
    """
    q, lay = np.ascontiguousarray(q, np.float32), _key_layers(q, None)
    m, n = (q.shape[2] // keys.shape[2]) * q.shape[1], len(kpos)
    if not parallel:
        return _heads_serial(q, qpos, keys, kpos, np.float32(scale), lay, _workspace(m * n))
    g = _groups(len(lay) * keys.shape[2])
    return _heads_parallel(q, qpos, keys, kpos, np.float32(scale), lay, _workspace(g * m * n), g)


@numba.njit(**_JIT)
def _heads_serial(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32,
                  layers: np.ndarray, work: np.ndarray) -> np.ndarray:
    n_l, n_kv, n_r, n_h = q.shape[0], keys.shape[2], q.shape[1], q.shape[2]
    out = np.zeros((n_l * n_h, len(kpos)), np.float32)
    for t in range(n_l * n_kv):
        p = _head_softmax(q, qpos, keys, kpos, scale, t // n_kv, layers[t // n_kv], t % n_kv, work)
        _sum_rows(p, (t // n_kv) * n_h + (t % n_kv) * (n_h // n_kv), n_r, out)
    return out


@numba.njit(parallel=True, **_JIT)
def _heads_parallel(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32,
                    layers: np.ndarray, work: np.ndarray, groups: int) -> np.ndarray:
    n_l, n_kv, n_r, n_h = q.shape[0], keys.shape[2], q.shape[1], q.shape[2]
    span = (n_h // n_kv) * n_r * len(kpos)
    out = np.zeros((n_l * n_h, len(kpos)), np.float32)
    for g in numba.prange(groups):  # each (layer, KV head) writes its own rows of ``out``
        for t in range(g, n_l * n_kv, groups):
            p = _head_softmax(q, qpos, keys, kpos, scale, t // n_kv, layers[t // n_kv], t % n_kv,
                              work[g * span : (g + 1) * span])
            _sum_rows(p, (t // n_kv) * n_h + (t % n_kv) * (n_h // n_kv), n_r, out)
    return out


@numba.njit(**_JIT)
def _sum_rows(p: np.ndarray, base: int, n_r: int, out: np.ndarray) -> None:
    """Add softmax rows ``p`` [group * R, N] of one KV head into ``out`` rows base.. (one per query head)."""
    for i in range(p.shape[0]):
        out[base + i // n_r] += p[i]


_KEY_BLOCK = 64  # key rows decoded from float16 at a time (64 x 128 x 4 bytes: 32 KB), or a thread's share


@intrinsic
def _fpext_half(typingctx, bits):  # noqa: ANN001, ANN202 - Numba's intrinsic protocol
    """A float16 bit pattern's value as a float32 by LLVM's ``fpext half``: one instruction where the CPU has it."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _as_float(typingctx, bits):  # noqa: ANN001, ANN202
    """A float32 bit pattern as its float32."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


# 2**112: rescales a float16's exponent and mantissa bits, shifted into a float32, to the float16's value
_F16_RESCALE = np.float32(2.0**112)


@numba.njit(inline="always", **_JIT)
def _half_by_bits(h16: np.uint16) -> np.float32:
    """:func:`_fpext_half` in integer steps, for CPUs without the instruction: sign, exponent and mantissa shifted
    into place, then one multiply rescales normals and subnormals alike (the sign rides along); inf and nan keep
    their mantissa's bits."""
    h = np.uint32(h16)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    if h & np.uint32(0x7C00) == np.uint32(0x7C00):
        return _as_float(np.uint32(0x7F800000) | ((h & np.uint32(0x3FF)) << np.uint32(13)) | sign)
    return _as_float(((h & np.uint32(0x7FFF)) << np.uint32(13)) | sign) * _F16_RESCALE


def _hardware_f16() -> bool:
    """Whether Numba's code for this machine converts float16 in hardware: every ARMv8 CPU, x86's with F16C (since
    2012); without it LLVM would call a helper that Numba's JIT may not link. NUMBA_CPU_NAME (a portable cache) turns
    the host's features off; NUMBA_CPU_FEATURES, when set, is what Numba compiles for."""
    if os.environ.get("NUMBA_CPU_NAME"):
        return False
    if (features := os.environ.get("NUMBA_CPU_FEATURES")) is not None:
        return "+f16c" in features.split(",")
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return True
    return machine in ("x86_64", "amd64") and "f16c" in _x86_features()


def _x86_features() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo's on Linux, else LLVM's view of the host. llvmlite's
    ``get_host_cpu_features`` aborted the process ("free(): invalid pointer") on an H200's host, Python 3.12,
    llvmlite 0.50, once llama.cpp's CUDA build was loaded and Numba had compiled: importing asrkf_edge aborted there
    (docs/gpu.md, eighteenth session)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    try:
        return {name for name, on in llvm.get_host_cpu_features().items() if on}
    except RuntimeError:  # features unknown on this host
        return set()


half_to_float = _fpext_half if _hardware_f16() else _half_by_bits
"""A float16 bit pattern (uint16: Numba has no float16 type) as a float32, exactly: the kernels' one conversion.
By instruction (F16C's vcvtph2ps), 30 layers of 8,000 keys of the default model take 7.3 ms on one thread of the
2-core EPYC, against 20.1 in three vectorized integer passes over blocks of rows."""


@numba.njit(**_JIT)
def f16_to_f32(keys: np.ndarray, layer: int, kpos: np.ndarray, kh: int, bits: np.ndarray) -> None:
    """Rows ``keys[layer, kpos[j], kh]`` (float16 bit patterns) into float32 bit patterns ``bits[j]``. A block at a
    time, not a row per call: per row, the call and the views around it cost more than the conversion (observed
    at 2.8k keys: 22 -> 6.6 ms on this machine's Xeon with the dot products)."""
    out = bits.view(np.float32)
    for j in range(len(kpos)):
        src = keys[layer, kpos[j], kh]
        for e in range(bits.shape[1]):
            out[j, e] = half_to_float(src[e])


# reassociation lets LLVM vectorize the dot products (the NumPy twin agrees to ~1e-9)
@numba.njit(**{**_JIT, "fastmath": {"reassoc", "contract"}})
def _head_softmax(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: np.float32,
                  layer: int, key_layer: int, kh: int, work: np.ndarray) -> np.ndarray:
    """Causal softmax of one layer's KV head's ``group`` query heads (query layer ``layer``, key layer
    ``key_layer``) over the keys: [group * R, N], row ``g * R + r`` for query head ``kh * group + g`` and query
    row ``r``, written into the front of ``work`` (the caller's scratch, at least group * R * N). Each key row is
    decoded once, ``_KEY_BLOCK`` rows at a time into a buffer that stays in L1: decoded all at once, the keys of one
    head took a fresh N x d float32 array (8 MB at 16k keys of 128), written and read back from memory, in every
    one of the (layer, KV head) tasks."""
    n_r, n_h, d = q.shape[1], q.shape[2], q.shape[3]
    group = n_h // keys.shape[2]
    n, m = len(kpos), group * n_r
    qs = np.empty((m, d), np.float32)
    for i in range(m):
        for e in range(d):
            qs[i, e] = q[layer, i % n_r, kh * group + i // n_r, e] * scale
    bits = np.empty((_KEY_BLOCK, d), np.uint32)
    k = bits.view(np.float32)
    logit = work[: m * n].reshape((m, n))
    for j0 in range(0, n, _KEY_BLOCK):
        nb = min(_KEY_BLOCK, n - j0)
        f16_to_f32(keys, key_layer, kpos[j0 : j0 + nb], kh, bits[:nb])
        for jj in range(nb):
            for i in range(m):
                acc = np.float32(0.0)
                for e in range(d):
                    acc += qs[i, e] * k[jj, e]
                logit[i, j0 + jj] = acc
    for i in range(m):
        inv = _exp_visible(logit[i], kpos, qpos[i % n_r])
        for j in range(n):
            logit[i, j] *= inv
    return logit


@numba.njit(**{**_JIT, "fastmath": {"reassoc", "contract"}})
def _exp_visible(row: np.ndarray, kpos: np.ndarray, qpos: int) -> np.float32:
    """A row of logits over keys at ``kpos`` into exp(logit - its visible top), keys after ``qpos`` zeroed; returns
    1 / their sum, the factor that makes it the causal softmax."""
    top = np.float32(-np.inf)
    for j in range(len(kpos)):
        if kpos[j] <= qpos and row[j] > top:
            top = row[j]
    exp_shifted(row, top)
    total = np.float32(0.0)
    for j in range(len(kpos)):
        if kpos[j] > qpos:
            row[j] = np.float32(0.0)
        total += row[j]
    return np.float32(1.0) / total


_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504), np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


@numba.njit(**{**_JIT, "fastmath": {"contract"}})
def exp_shifted(x: np.ndarray, shift: np.float32) -> None:
    """``x <- exp(x - shift)`` in place, for ``x <= shift`` (a softmax row less its top): Cephes' expf, reduced by
    multiples of ln 2 and a degree-6 polynomial, with neither a call nor a branch per element, so that LLVM
    vectorizes it. libm's expf, a call per element, took 8.7 of a re-evaluation's ~25 ms (8 query rows, 8,000
    keys of the default model; this 2-core EPYC), this loop 0.8. Within 2e-7 relative of float64 exp down to an
    exponent of -87; below it gives 2**-125.5 or so where exp gives less (a share of 1e-38 in a sum of at least 1)."""
    c5, c4, c3, c2, c1, c0 = _EXP_POLY
    bits = x.view(np.int32)
    for j in range(x.shape[0]):
        v = max(x[j] - shift, np.float32(-87.0))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - k * _LN2_HI - k * _LN2_LO
        p = ((((c5 * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
        x[j] = p * r * r + r + np.float32(1.0)
        bits[j] += np.int32(k) << np.int32(23)  # times 2**k: k added to the exponent


def layer_mass(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, key_layer: int, kpos: np.ndarray, scale: float) -> np.ndarray:
    """Causal softmax attention of one layer's query rows q [R, H, d] over the mirrored keys of mirror layer
    ``key_layer`` at ``kpos``, summed over query heads and rows: [N] (:mod:`.recall`, every layer of every decode).
    One pass over the keys, every KV head of a block of key rows decoded together: per KV head (as
    :func:`attention_mass` goes) each key row was read three times, 0.196 ms a layer for 1,900 keys of the default
    model in a decode (the rows came from memory each time)."""
    q = np.ascontiguousarray(q, np.float32)
    m, n = q.shape[0] * q.shape[1], len(kpos)
    out = np.zeros(n, np.float32)
    layer_mass_into(q, qpos, keys, key_layer, kpos, np.float32(scale), _workspace(m * n), out)
    return out


# Blocks of keys on Numba's threads: inside llama.cpp's graph its own (OpenMP) threads wait for the next node, and
# Numba's OpenMP layer runs on that idle team: recall's scoring 6.2 -> 4.1 ms a token at 2k, the token 16.5-17.2 ->
# 14.3-15.1 ms (2-core EPYC, both on libgomp; builds with ggml's own thread pool unmeasured). Blocks write disjoint
# logits and the softmax stays serial: the serial kernel's masses bit for bit.
@numba.njit(parallel=True, **{**_JIT, "fastmath": {"reassoc", "contract"}})
def layer_mass_into(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, key_layer: int, kpos: np.ndarray, scale: np.float32,
                    work: np.ndarray, out: np.ndarray) -> None:
    """:func:`layer_mass`'s kernel: the masses added into ``out`` (zeroed by the caller), the logits in ``work`` (at least
    R * H * N); callable from other kernels (:mod:`.recall`'s callback)."""
    n_r, n_h, d = q.shape
    n_kv, n = keys.shape[2], len(kpos)
    gm = n_h // n_kv * n_r  # query rows a KV head serves
    m = n_h * n_r
    qs = np.empty((m, d), np.float32)  # row h * R + r
    for i in range(m):
        for e in range(d):
            qs[i, e] = q[i % n_r, i // n_r, e] * scale
    logit = work[: m * n].reshape((m, n))
    for blk in numba.prange((n + _KEY_BLOCK - 1) // _KEY_BLOCK):
        for j in range(blk * _KEY_BLOCK, min(n, blk * _KEY_BLOCK + _KEY_BLOCK)):
            row = keys[key_layer, kpos[j]]  # every KV head's key, one read
            for kh in range(n_kv):
                for i0 in range(kh * gm, kh * gm + gm, 3):
                    _three_dots(qs, i0, min(i0 + 1, kh * gm + gm - 1), min(i0 + 2, kh * gm + gm - 1), row[kh],
                                logit, j)
    inv = np.empty(m, np.float32)
    for i in numba.prange(m):  # rows apart; their sum below in order, the serial kernel's bits
        inv[i] = _exp_visible(logit[i], kpos, qpos[i % n_r])
    for i in range(m):
        for j in range(n):
            out[j] += logit[i, j] * inv[i]


@numba.njit(**{**_JIT, "fastmath": {"reassoc", "contract"}})
def _three_dots(qs: np.ndarray, i0: int, i1: int, i2: int, key: np.ndarray, logit: np.ndarray, j: int) -> None:
    """Three query rows' logits of one float16 key (a row twice where fewer are left): each element converted once
    in a register, three sums at once. Against a block of rows decoded to float32 first, then one dot product per
    query row: 15.9 -> 7.6 ms for 30 layers of 8,000 keys of the default model (one thread, 2-core EPYC)."""
    a0, a1, a2 = np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for e in range(len(key)):
        x = half_to_float(key[e])
        a0 += qs[i0, e] * x
        a1 += qs[i1, e] * x
        a2 += qs[i2, e] * x
    logit[i0, j], logit[i1, j], logit[i2, j] = a0, a1, a2


@numba.njit(**_JIT)
def pick_swaps(mass: np.ndarray, nf: int, size: int, top: np.ndarray, low: np.ndarray, ratio: float = 1.0) -> int:
    """Recall's exchange (:mod:`.recall`), ``mass`` = frozen tokens' then active tokens' (from ``nf`` on): the
    ``size`` most attended frozen into ``top`` (most first) and the ``size`` least attended active into ``low``
    (least first; ties by index), returns how many pairs gain (the i-th frozen above ``ratio`` times the i-th
    active: a prefix). In one call: NumPy's partitions and sorts cost 22 us a layer in Python (1,900 keys, 2-core
    EPYC)."""
    k = min(size, nf, len(mass) - nf)
    if k < 1:
        return 0
    _top_k(-mass[:nf], k, top)
    _top_k(mass[nf:], k, low)
    gain = 0
    while gain < k and mass[top[gain]] > np.float32(ratio) * mass[nf + low[gain]]:
        gain += 1
    return gain


@numba.njit(**_JIT)
def _top_k(x: np.ndarray, k: int, out: np.ndarray) -> None:
    """Indices of the ``k`` smallest of ``x`` into ``out[:k]``, smallest first, ties by index."""
    bar = np.partition(x, k - 1)[k - 1]
    n = 0
    for i in range(len(x)):  # strictly below the bar: at most k - 1, in index order
        if x[i] < bar:
            out[n] = i
            n += 1
    for i in range(len(x)):
        if n == k:
            break
        if x[i] == bar:
            out[n] = i
            n += 1
    order = np.argsort(x[out[:k]], kind="mergesort")  # stable: ties stay in index order
    out[:k] = out[:k][order]


def pick_swaps_reference(mass: np.ndarray, nf: int, size: int, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """NumPy twin of :func:`pick_swaps`: (top, low, gain)."""
    k = min(size, nf, len(mass) - nf)
    if k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    f, a = mass[:nf], mass[nf:]
    top = np.lexsort((np.arange(nf), -f))[:k]
    low = np.lexsort((np.arange(len(a)), a))[:k]
    return top, low, int(np.count_nonzero(f[top] > np.float32(ratio) * a[low]))


def layer_mass_reference(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, key_layer: int, kpos: np.ndarray,
                         scale: float) -> np.ndarray:
    """NumPy twin of :func:`layer_mass`."""
    p = _softmax_reference(q[None], qpos, keys[key_layer : key_layer + 1], kpos, scale)  # [1, R, H, N]
    return p.sum(axis=(0, 1, 2)).astype(np.float32)


def _softmax_reference(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float) -> np.ndarray:
    """Causal softmax of every layer, row and query head over the keys, float64 [L, R, H, N]."""
    k = keys[:, kpos].view(np.float16).astype(np.float64)  # [L, N, Hkv, d]
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)  # [L, N, H, d]
    logits = np.einsum("lrhd,lnhd->lrhn", q.astype(np.float64), k) * scale
    visible = kpos[None, :] <= qpos[:, None]  # [R, N]
    logits = np.where(visible[None, :, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def attention_mass_reference(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float) -> np.ndarray:
    """NumPy twin of :func:`attention_mass`."""
    return _softmax_reference(q, qpos, keys, kpos, scale).mean(axis=(0, 2)).astype(np.float32)


def head_scores_reference(q: np.ndarray, qpos: np.ndarray, keys: np.ndarray, kpos: np.ndarray, scale: float) -> np.ndarray:
    """NumPy twin of :func:`head_scores`."""
    p = _softmax_reference(q, qpos, keys, kpos, scale).sum(axis=1)  # [L, H, N]
    return p.reshape(-1, len(kpos)).astype(np.float32)


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


def keys_to_f16(src: np.ndarray, dst: np.ndarray) -> None:
    """Write float32 keys into a float16 array of the same size (the key mirror), rounded to nearest even as NumPy's
    cast rounds (NaN stays NaN). NumPy's cast wrote a 512-token prompt chunk's keys of 32 layers into touched pages in
    28 ms on 2 EPYC cores, this kernel in 7 (Numba has no float16; the bits are built from the float32's); an H100's
    host spent 2.7 s of a 16k prompt's 9.3 s read in that write (docs/gpu.md, thirty-first session)."""
    if not dst.flags.c_contiguous or dst.dtype != np.float16 or dst.size != src.size:
        raise ValueError("keys_to_f16 writes a contiguous float16 array of the source's size")
    _f16_bits(np.ascontiguousarray(src, np.float32).reshape(-1), dst.reshape(-1).view(np.uint16))


@numba.njit(**_JIT)
def _f16_bits(src: np.ndarray, dst: np.ndarray) -> None:
    s = src.view(np.uint32)
    one = np.uint32(1)
    for i in range(len(s)):
        a = s[i] & np.uint32(0x7FFFFFFF)
        if a >= np.uint32(0x477FF000):  # rounds to 2^16 or more: infinity; or NaN
            h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
        elif a >= np.uint32(0x38800000):  # a normal half: drop 13 bits, ties to even
            h = (a - np.uint32(0x38000000)) >> np.uint32(13)
            rem = a & np.uint32(0x1FFF)
            h += (rem > np.uint32(0x1000)) | ((rem == np.uint32(0x1000)) & (h & one))
        elif a >= np.uint32(0x33000000):  # a subnormal half (or the smallest normal, rounded up)
            m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
            shift = np.uint32(126) - (a >> np.uint32(23))  # 14..24
            h = m >> shift
            rem, half = m & ((one << shift) - one), one << (shift - one)
            h += (rem > half) | ((rem == half) & (h & one))
        else:
            h = np.uint32(0)
        dst[i] = np.uint16(((s[i] >> np.uint32(16)) & np.uint32(0x8000)) | h)


def entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits): NumPy's max, then one fused pass of a vectorised exp. Checked every
    decode while anything is frozen, so it sits on every token's path: NumPy's subtract, exp and two dots took 83 us
    on 128k logits; this takes 22 (49k: 42 -> 9), within 2e-6 of the float64 reference (2-core EPYC). Inside an H100
    host's decodes at 16k 0.21-0.24 -> 0.08 ms a token (the logits arrive cold from the GPU's copy; docs/gpu.md).
    Logits of -inf (banned tokens) count as zero probability; NumPy's version gave NaN there."""
    x = np.ascontiguousarray(logits, np.float32)
    return float(_entropy_pass(x, x.max()))


_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.4426950408889634), np.float32(0.693145751953125), np.float32(1.428606765330187e-06)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, error_model="numpy")
def _entropy_pass(x: np.ndarray, m: np.float32) -> float:
    """log Z - sum(e^d d) / Z over d = x - m, with e^d as 2^k p(r) (Cody-Waite reduction, a degree-6 Taylor polynomial,
    relative error < 2e-7 on |r| <= ln2/2) so that LLVM vectorises the loop: Numba's exp is a scalar libm call here
    (no SVML). d is clamped at -87, where e^d ~ 1.6e-38 is still a normal float32 and nothing next to Z >= 1."""
    z = np.float32(0.0)
    s = np.float32(0.0)
    for i in range(len(x)):
        d = max(x[i] - m, np.float32(-87.0))
        k = np.floor(d * _LOG2E + np.float32(0.5))
        r = d - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1.0 / 720.0) * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        e = p * _as_float(np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23))
        z += e
        s += e * d
    return np.log(np.float64(z)) - np.float64(s) / np.float64(z)


def entropy_reference(logits: np.ndarray) -> float:
    """NumPy twin of :func:`entropy`."""
    x = logits.astype(np.float64) - logits.max()
    p = np.exp(x) / np.exp(x).sum()
    return float(-(p * np.log(np.where(p > 0, p, 1.0))).sum())


class QueryWindow:
    """The newest ``size`` query rows kept across decodes, in position order; rows a re-decode computes again
    replace the old ones. Rows are appended into a buffer of twice ``size`` and slid to its front when it
    fills, so a decode copies its own rows only: concatenating the window on every observation copied it
    twice (33 MB per observation on the LLaMA-3-8B shape, about 1 ms a token on an H200's host)."""

    def __init__(self, size: int, shape: tuple[int, int, int]) -> None:
        self.size = size
        layers, heads, dim = shape
        self._q = np.zeros((layers, 2 * size, heads, dim), np.float32)
        self._pos = np.zeros(2 * size, np.int64)
        self._lo = self._hi = 0  # rows [lo, hi) are kept

    def keep(self, q: np.ndarray, end: int) -> None:
        """Append the newest rows ``q`` [L, rows, H, d] (positions up to ``end``), replacing re-decoded ones."""
        q = q[:, q.shape[1] - min(q.shape[1], self.size) :]
        r = q.shape[1]
        if r == 0:
            return
        first = end - r
        hi = self._lo + int(np.searchsorted(self._pos[self._lo : self._hi], first))  # rows before the new ones
        lo = max(self._lo, hi + r - self.size)
        if hi + r > len(self._pos):  # slide what stays to the front
            n = hi - lo
            self._q[:, :n] = self._q[:, lo:hi]
            self._pos[:n] = self._pos[lo:hi]
            lo, hi = 0, n
        self._q[:, hi : hi + r] = q
        self._pos[hi : hi + r] = np.arange(first, end, dtype=np.int64)
        self._lo, self._hi = lo, hi + r

    def recent(self, rows: int, complete: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``rows`` kept rows (views) and their positions; ``complete``: of the rows that have every
        layer's queries (a split-mode decode keeps the scored layers' only, NaN elsewhere)."""
        lo = max(self._lo, self._hi - max(rows, 0))
        if complete:
            whole = ~np.isnan(self._q[:, self._lo : self._hi, 0, 0]).any(axis=0)
            if not whole[lo - self._lo :].all():
                keep = self._lo + np.flatnonzero(whole)
                keep = keep[len(keep) - min(len(keep), max(rows, 0)) :]
                return self._q[:, keep], self._pos[keep]
        return self._q[:, lo : self._hi], self._pos[lo : self._hi]

    def load(self, q: np.ndarray, pos: np.ndarray) -> None:
        """Keep exactly these rows (a saved window)."""
        n = len(pos)
        self._q[:, :n], self._pos[:n] = q, pos
        self._lo, self._hi = 0, n


# tracker -----------------------------------------------------------------------------------------


class _Held(Future[T]):
    """A worker job's future whose job is handed to the worker later (:meth:`Importance.flush`): waiting for it
    hands it over first."""

    def __init__(self, flush: Callable[[], None]) -> None:
        super().__init__()
        self._flush = flush

    def result(self, timeout: float | None = None) -> T:
        self._flush()
        return super().result(timeout)

    def run(self, job: Callable[..., T], args: tuple[object, ...]) -> None:
        """On the worker: ``job(*args)`` into this future."""
        if not self.set_running_or_notify_cancel():
            return
        try:
            self.set_result(job(*args))
        except BaseException as e:  # handed to whoever waits, as ThreadPoolExecutor does
            self.set_exception(e)


@cache
def _worker() -> ThreadPoolExecutor:
    """The one thread that runs background folds (each tracker waits only for its own)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="asrkf-fold", initializer=_spare_a_core)


def _spare_a_core() -> None:
    """The worker's parallel folds run on all of Numba's threads but one (the setting is per calling thread): they run
    during llama.cpp's decode, whose thread spins on the GPU's synchronisations, and on all 16 cores of an H100 host
    that decode call grew by up to 0.1 ms a token (docs/gpu.md, twenty-sixth session)."""
    numba.set_num_threads(max(1, numba.get_num_threads() - 1))


def _position_blocks(keys: np.ndarray, start: int, stop: int, block: int = 512) -> list[tuple[int, int]]:
    """Byte ranges of ``keys`` ([layers, positions, row]) for positions [start, stop), block by block of positions
    and layer by layer within a block: the order in which a prompt's chunks write them."""
    row = keys.shape[2] * keys.itemsize
    per_layer = keys.shape[1] * row
    return [(layer * per_layer + a * row, layer * per_layer + min(stop, a + block) * row)
            for a in range(start, stop, block) for layer in range(keys.shape[0])]


class Importance:
    """Per-position importance scores and key mirror, updated after every decode of a session.

    ``gamma``/``weight`` choose the fold: an EMA over the window (ASR-KF) or a plain running sum (H2O).
    ``stride``: decode steps per observation. ``mirror_keys`` keeps the post-RoPE keys of the scored layers
    (f16, by position) for scoring frozen tokens against new queries and for flash attention; without it
    only ``kq_soft_max`` is used and every step is observed. With the mirror, a single-token decode is
    captured only on observation steps (a captured node costs the graph a synchronisation: measured 25%
    of decode speed with 30 layers on CPU); keys of the steps in between are read back from the cache
    when first needed (:meth:`ensure_keys`, through ``fetch``) or when they are frozen (:meth:`on_copy`).
    ``fold_layers``: how many of the layers (evenly spaced) the decayed score is folded from.
    ``split`` (layers on a CUDA GPU, flash attention, ``stride`` above 1): every single-token decode asks the capture
    for the scored layers' queries (:attr:`Capture.split`), copied only on observation steps, so that every decode
    is cut into the same graph views and a CUDA backend keeps its graphs; an observed decode then has those
    layers' queries only, and its keys are read back like an unobserved one's.
    ``background`` (on when the layers are on a GPU): the host attention of an observation (and of a policy's
    :meth:`mass_job`) runs on a worker thread while llama.cpp decodes the next tokens (ctypes releases the Python
    lock). A job reads mirror rows that were known when it was queued and writes the scores of positions before
    its queries; every reader of the scores waits for the folds, so the scores are the inline fold's. A decode of
    new positions does not wait: the fold then has until the next reader (the next observation, 8 decodes on) to
    finish, where it had one decode before (each decode waited for the fold queued after the one before it).
    A :meth:`mass_job` writes no scores: readers of the scores do not wait for one queued after the last fold.
    ``generation`` counts the decodes that computed positions again (their keys and queries changed): a mass
    computed before is stale when it moved.
    """

    def __init__(self, model: Model, layers: tuple[int, ...], window: int, flash_attn: bool,
                 decay: bool = True, mirror_keys: bool = True, stride: int = 1, keep_queries: int = 0,
                 fold_layers: int = 8) -> None:
        if stride < 1 or fold_layers < 1:
            raise ValueError(f"stride and fold_layers must be >= 1, got {stride} and {fold_layers}")
        self.model = model
        self.mirror_keys = mirror_keys or flash_attn
        self.sparse = mirror_keys  # decode steps captured only when observed (keys can be read back)
        self.stride = stride if self.sparse or flash_attn else 1
        self.layers = layers
        picks = np.unique(np.round(np.linspace(0, len(layers) - 1, min(fold_layers, len(layers)))).astype(int))
        self.fold = tuple(int(i) for i in picks)  # indices into ``layers``
        self.window = window
        self.flash_attn = flash_attn
        self.gamma, self.weight = (1.0 - 1.0 / window, 1.0 / window) if decay else (1.0, 1.0)
        self.scale = 1.0 / float(np.sqrt(model.head_dim))
        self.parallel = model.offloaded  # the CPU cores idle while the GPU decodes: score on all of them
        self._scores = np.zeros(1024, np.float32)
        self.background = self.parallel  # fold on a worker thread while the GPU decodes the next token
        self.split = self.parallel and flash_attn and self.sparse and self.stride > 1 and cuda_graphs()
        self._pending: list[tuple[Future[object], bool, int]] = []  # worker jobs, oldest first: (job, folds, upto)
        self._held: list[tuple[_Held[object], Callable[..., object], tuple[object, ...]]] = []  # not yet handed over
        self._upto = 0  # the pending jobs read keys and write scores of positions below this
        self._seen = 0  # positions decoded so far
        self.generation = 0
        self._kv = model.n_head_kv * model.head_dim
        self.keys = np.zeros((len(layers), 1024 if self.mirror_keys else 0, self._kv), np.float16)
        self.known = np.zeros(1024 if self.mirror_keys else 0, bool)  # which positions the mirror holds
        self.capture: Capture | None = None
        self.fetch: Callable[[np.ndarray], object] | None = None  # reads keys of active positions back
        self.keep_queries = keep_queries if self.mirror_keys else 0
        self._kept = QueryWindow(self.keep_queries, (len(layers), model.n_head, model.head_dim))

    def spec(self) -> CaptureSpec:
        """What the session's capture must copy for this tracker."""
        rows = max(self.window, self.keep_queries)
        scored = tuple(self.layers[i] for i in self.fold)
        # In the background the keys are read back from the cache (one gather, float16 as the mirror holds them) instead
        # of copied out of every layer's graph and rounded here: on an H100's host those writes took 0.82 s of a 16k
        # prompt's 6.1 s read (docs/gpu.md, thirty-second session)
        keys = self.mirror_keys and not self.background
        return CaptureSpec(self.layers, rows, probs=not self.flash_attn, queries=self.mirror_keys, keys=keys,
                           prob_layers=scored, split_layers=scored if self.flash_attn else ())

    def wants(self, pos0: int, n: int) -> bool:
        """Whether the decode of positions pos0.. (n tokens) should be captured."""
        return not self.sparse or n > 1 or pos0 % self.stride == 0

    @property
    def mirror_bytes(self) -> int:
        """Bytes of the keys held for scoring (positions whose keys are known; room reserved ahead is not counted)."""
        if not self.mirror_keys:
            return 0
        return int(self.known.sum()) * len(self.layers) * self._kv * self.keys.itemsize

    def reserve(self, n: int) -> None:
        """Room for ``n`` positions now, so that no doubling copy of the mirror lands inside a decode loop."""
        self._grow(n)

    def _grow(self, n: int) -> None:
        if n > len(self._scores):
            self._wait(folds_only=True)  # the folds write the arrays about to be replaced
            cap = max(n, 2 * len(self._scores))
            self._scores = np.concatenate([self._scores, np.zeros(cap - len(self._scores), np.float32)])
            if self.mirror_keys:  # zeroed pages from the allocator, faulted in when keys are written: a concatenate
                # wrote every byte first (the 8B shape's 32 layers at 16k: 1.1 GB). A 4k prompt read as on a GPU with
                # that KV shape on 2 EPYC cores: growth and key writes 1.55 s -> 0.81 (0.79 of it the writes' faults)
                keys = np.zeros((len(self.layers), cap, self._kv), np.float16)
                old = self.keys.shape[1]
                keys[:, :old] = self.keys
                self.keys = keys
                if self.model.offloaded:  # the host's cores are idle while the GPU decodes: fault the rest in there
                    pages.fault_in(keys, _position_blocks(keys, old, cap))
                self.known = np.concatenate([self.known, np.zeros(cap - len(self.known), bool)])

    def observe(self, cells: Callable[[], np.ndarray], pos0: int, n: int, fold_scores: bool = True) -> None:
        """Fold the last decode (positions pos0..pos0+n-1) into the scores; ``cells()`` maps cells to
        positions of sequence 0 (-1 elsewhere), asked only on an observed decode (0.02-0.03 ms a token on an H100's
        host at 16k when it was made for every decode). New tokens start at the uniform share 1/logical tokens.
        ``fold_scores=False`` (tokens read again): keys and queries are taken, the scores left as they are:
        these positions were scored and their queries folded when first read."""
        cap = self.capture
        assert cap is not None
        if pos0 < self._upto:  # positions read again that a job reads or scores
            self._wait()
        if pos0 < self._seen:
            self.generation += 1
        self._seen = max(self._seen, pos0 + n)
        self._grow(pos0 + n)
        if fold_scores:
            self._scores[pos0 : pos0 + n] = 1.0 / (pos0 + n)
        if not cap.enabled:  # not observed: its keys are read back when needed
            if self.mirror_keys:
                self.known[pos0 : pos0 + n] = False
            return
        if self.mirror_keys:
            keys = [cap.keys(layer) for layer in self.layers]
            whole = all(k is not None for k in keys)  # a split-mode decode copies no keys: read back when needed
            for i, k in enumerate(keys):
                if k is not None:
                    keys_to_f16(k, self.keys[i, pos0 : pos0 + n])
            self.known[pos0 : pos0 + n] = whole
        q = self.queries() if self.keep_queries else None  # stacked once, also for the host attention below
        if q is not None:
            self._kept.keep(q, pos0 + n)
        if not fold_scores:
            return
        rows = min(n, self.window)
        qpos = np.arange(pos0 + n - rows, pos0 + n, dtype=np.int64)
        gamma, weight = self.gamma, self.weight
        if n == 1 and self.stride > 1:  # one query in ``stride`` stands for them all: same steady state
            if pos0 % self.stride:
                return
            gamma, weight = self.gamma**self.stride, self.weight * sum(self.gamma**i for i in range(self.stride))
        if not self.flash_attn:
            probs = [p for i in self.fold if (p := cap.probs(self.layers[i])) is not None]
            if not probs:
                return
            mass = np.mean([p[:, -rows:].mean(axis=0) for p in probs], axis=0)  # [rows, n_kv]
            kpos = cells()[: mass.shape[1]]
        else:
            cell_pos = cells()
            kpos = np.sort(cell_pos[cell_pos >= 0]).astype(np.int64)
            q = (q if q is not None else self.queries())[:, -rows:]
            if self.background:
                self.ensure_keys(kpos)  # llama.cpp calls stay on this thread
                self._queue(self._fold_from_mirror, True, q, qpos, kpos, self.mirror(), gamma, weight, n > 1)
                return
            mass = self.mass(q, qpos, kpos, self.fold)
        fold(self._scores, np.ascontiguousarray(mass, np.float32), kpos.astype(np.int64), qpos, gamma, weight)

    def _fold_from_mirror(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray, keys: np.ndarray, gamma: float,
                          weight: float, chunk: bool = False) -> None:
        """``chunk``: a prompt chunk's fold, which the next chunk's eviction waits for while no decode runs: on all of
        Numba's threads (a reply's fold leaves one to llama.cpp's decode, :func:`_spare_a_core`). Its 4 layers x 8 KV
        heads of the LLaMA-3-8B shape are 3 rounds of 15 threads and 2 of 16; an H100's host spent 1.24 s of a 16k
        prompt's 6.1 s read in these folds, the eviction waiting for nearly all of it. Measured only together with the
        keys read back and the mirror faulted in ahead: the read 5.33 -> 4.76 s (docs/gpu.md, thirty-second session)."""
        kept = numba.get_num_threads()
        if chunk:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        try:
            mass = self._mass(q, qpos, kpos, self.fold, keys)
        finally:
            numba.set_num_threads(kept)
        fold(self._scores, np.ascontiguousarray(mass, np.float32), kpos, qpos, gamma, weight)

    def _queue(self, job: Callable[..., T], folds: bool, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray,
               *args: object) -> Future[T]:
        """Run ``job(q, qpos, kpos, *args)`` on the worker thread, after the jobs queued before it (``folds``: it
        writes the scores). The worker gets it at the next decode (:meth:`flush`) or when it is first waited for."""
        done: _Held[T] = _Held(self.flush)
        self._held.append((done, job, (q, qpos, kpos, *args)))
        upto = max(int(qpos.max(initial=-1)) + 1, int(kpos.max(initial=-1)) + 1)
        self._pending.append((done, folds, upto))
        self._upto = max(self._upto, upto)
        return done

    def flush(self) -> None:
        """Hand the queued jobs to the worker; the runner calls it just before each decode. Inside llama.cpp's call
        this thread has let go of the GIL, so the job's Python runs beside it; handed over at once, the worker took
        the GIL from this thread's policy work instead: the next NumPy call after each hand-over waited 0.40 ms on
        average (2-core EPYC, the tracker as on a GPU, 128k vocabulary, 32 layers)."""
        held, self._held = self._held, []
        for done, job, args in held:
            _worker().submit(done.run, job, args)

    def _wait(self, folds_only: bool = False) -> None:
        """Finish the jobs on the worker thread: all of them before a kernel runs here (Numba's thread pool takes
        one parallel kernel at a time) or positions are read again; up to the last fold for a reader of the scores
        (the worker runs jobs in order)."""
        last = max((i for i, (_, folds, _) in enumerate(self._pending) if folds), default=-1) if folds_only else len(self._pending) - 1
        done, self._pending = self._pending[: last + 1], self._pending[last + 1 :]
        self._upto = max((upto for _, _, upto in self._pending), default=0)
        for job, _, _ in done:
            job.result()

    @property
    def scores(self) -> np.ndarray:
        """Per-position importance (float32, by position; room beyond the context is zero)."""
        self._wait(folds_only=True)
        return self._scores

    def on_copy(self, pos: np.ndarray, parsed: Parsed) -> None:
        """Fill the mirror from KV rows copied out of the cache (a freeze or a read-back)."""
        self.on_keys(pos, parsed.k, parsed.layout.k_type)

    def on_keys(self, pos: np.ndarray, rows: Sequence[np.ndarray], k_type: int) -> None:
        """Fill the mirror from K rows of every model layer (``rows[layer]``: uint8 [n, row bytes] of ggml type
        ``k_type``) of the positions ``pos``; positions already known keep their rows. Rows in one f16 array
        [layers, n, row bytes] (a read-back) go in with one copy, a run of new positions as a slice."""
        if not self.mirror_keys:
            return
        self._grow(int(pos.max()) + 1)
        miss = np.flatnonzero(~self.known[pos])
        if not len(miss):
            return
        at = pos[miss]
        if isinstance(rows, np.ndarray) and k_type == GGML_F16:
            src = rows if self.layers == tuple(range(len(rows))) else rows[list(self.layers)]
            src = (src if len(miss) == len(pos) else src[:, miss]).view(np.float16)
            if at[-1] - at[0] + 1 == len(at) and bool(np.all(np.diff(at) == 1)):  # a run (the newest tokens)
                self.keys[:, at[0] : at[-1] + 1] = src
            else:
                self.keys[:, at] = src
        else:
            for i, layer in enumerate(self.layers):
                self.keys[i, at] = rows_as_f16(rows[layer][miss], k_type)
        self.known[at] = True

    def ensure_keys(self, positions: np.ndarray) -> None:
        """Read back the keys of these positions that the mirror lacks (decoded while not captured). It need not
        wait for the jobs: they read rows that were known when they were queued, and only unknown rows are
        written (:meth:`on_copy`)."""
        missing = positions[~self.known[positions]]
        if len(missing):
            if self.fetch is None:
                raise RuntimeError("keys missing from the mirror and no way to read them back")
            self.fetch(missing)

    def recent_queries(self, rows: int, complete: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``rows`` kept query rows across decodes, [L, rows, H, d], and their positions (``complete``:
        rows with every layer's queries; split mode keeps only the scored layers' of a decode)."""
        return self._kept.recent(rows, complete)

    def heads(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray) -> np.ndarray:
        """Per query head of the scored layers, the attention rows ``q`` give the mirrored keys at ``kpos``,
        summed over the rows: [L * H, len(kpos)]."""
        kpos = kpos.astype(np.int64)
        self._wait()
        self.ensure_keys(kpos)
        return head_scores(q, qpos, self.mirror(), kpos, self.scale, self.parallel)

    def of(self, positions: np.ndarray) -> np.ndarray:
        """Scores of ``positions`` (float64)."""
        return self.scores[positions].astype(np.float64)

    def state(self, n: int) -> dict[str, np.ndarray]:
        """Scores and mirrored keys of the first ``n`` positions."""
        out = {"scores": self.scores[:n].copy()}
        if self.mirror_keys:
            out["keys"], out["known"] = self.keys[:, :n].copy(), self.known[:n].copy()
        if self.keep_queries:
            out["recent_q"], out["recent_pos"] = (a.copy() for a in self._kept.recent(self.keep_queries))
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        n = len(state["scores"])
        self._wait()  # jobs read the mirror rows replaced here
        self._grow(n)
        self.scores[:n] = state["scores"]
        self.generation += 1
        self._seen = n
        if self.mirror_keys and "keys" in state:
            self.keys[:, :n] = state["keys"]
            self.known[:n] = state["known"]
        if self.keep_queries and "recent_q" in state:
            self._kept.load(state["recent_q"], state["recent_pos"].astype(np.int64))

    def queries(self) -> np.ndarray:
        """The last decode's newest queries, [L, rows, H, d]; NaN for layers not copied (split mode)."""
        cap = self.capture
        assert cap is not None
        got = [cap.queries(layer) for layer in self.layers]
        shape = next(q.shape for q in got if q is not None)
        return np.stack([q if q is not None else np.full(shape, np.nan, np.float32) for q in got])

    def mirror(self) -> np.ndarray:
        """The key mirror as the kernels take it: [L, positions, Hkv, d] float16 bits."""
        return self.keys.view(np.uint16).reshape(len(self.layers), -1, self.model.n_head_kv, self.model.head_dim)

    def mass(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray, layers: tuple[int, ...] | None = None) -> np.ndarray:
        """Attention mass [rows, len(kpos)] that queries ``q`` give the mirrored keys at ``kpos``, averaged over
        the scored layers (or those of ``layers``, indices into them) and heads."""
        kpos = kpos.astype(np.int64)
        self._wait()
        self.ensure_keys(kpos)
        return self._mass(q, qpos, kpos, layers)

    def mass_job(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray,
                 layers: tuple[int, ...] | None = None) -> Future[np.ndarray]:
        """:meth:`mass`, on the worker thread after the fold when the tracker folds in the background (its result
        is then ready a few decodes later), else here and now. The keys it needs are read back first, here."""
        kpos = kpos.astype(np.int64)
        if not self.background:
            done: Future[np.ndarray] = Future()
            done.set_result(self.mass(q, qpos, kpos, layers))
            return done
        self.ensure_keys(kpos)
        q, picks = self._picked(q, layers)  # the job gets a copy of the scored layers' rows, not of every layer's
        q = q if picks is not None else np.array(q)  # picking copied them already
        return self._queue(self._mass_of, False, q, qpos.copy(), kpos, picks, self.mirror())

    def _picked(self, q: np.ndarray, layers: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """``q`` cut to ``layers`` (indices into the tracker's layers) and the key layer of each row, or as it is."""
        if layers is not None and len(layers) < len(self.layers):
            return q[list(layers)], np.asarray(layers, np.int64)
        return q, None

    def _mass(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray, layers: tuple[int, ...] | None,
              keys: np.ndarray | None = None) -> np.ndarray:
        """``keys``: the mirror as a queued job found it (a later growth replaces the array, not the rows)."""
        q, picks = self._picked(q, layers)
        return self._mass_of(q, qpos, kpos, picks, keys)

    def _mass_of(self, q: np.ndarray, qpos: np.ndarray, kpos: np.ndarray, picks: np.ndarray | None,
                 keys: np.ndarray | None = None) -> np.ndarray:
        return attention_mass(q, qpos, self.mirror() if keys is None else keys, kpos, self.scale, self.parallel, picks)
