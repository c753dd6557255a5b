"""llama.cpp and ggml pointers: model, context, batch, sampler, memory and state, and ggml's backend devices
(GPU names and memory, page-locked host buffers).

Everything here is a thin, typed shell over ``llama_cpp.llama_cpp`` (llama-cpp-python's ctypes
bindings). llama.cpp failures become :class:`~asrkf_edge.errors.LlamaError` with llama.cpp's own
last log lines attached, so callers never see a NULL pointer or a bare return code.

Two other modules hold pointers, each for one job: :mod:`asrkf_edge.capture` (the ``cb_eval`` callback
reads ggml tensors inside the graph) and :mod:`asrkf_edge.kvcopy` (native row copies between buffers).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp.llama_cpp as L  # noqa: N812  (import before numpy: see NOTES, CUDA segfault)
import numpy as np

from . import native
from .errors import LlamaError, ModelError

log = logging.getLogger(__name__)

SCRATCH_SEQ = 1
"""Sequence id used as a staging area for freeze and thaw; the user's text lives in sequence 0."""

_backend_lock = threading.Lock()
_backend_ready = False
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.DEBUG}


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace").rstrip()
    if not msg:
        return
    if level == 4:  # GGML_LOG_LEVEL_ERROR: kept to explain the next LlamaError
        _recent_errors.append(msg)
    log.log(_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", msg)


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its logs into :mod:`logging`."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _backend_ready = True


def _fail(what: str) -> LlamaError:
    detail = "; ".join(_recent_errors)
    _recent_errors.clear()
    return LlamaError(f"{what}: {detail}" if detail else what)


def default_threads() -> int:
    """Threads for llama.cpp: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0) -> None:
        init_backend()
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = extra_buffers()
        self.n_gpu_layers = n_gpu_layers
        self.path = Path(path)
        ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise ModelError(str(_fail(f"llama.cpp could not load {self.path}")))
        self.ptr = ptr
        self.vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_layer = L.llama_model_n_layer(ptr)
        self.n_head = L.llama_model_n_head(ptr)
        self.n_head_kv = L.llama_model_n_head_kv(ptr)
        self.n_embd = L.llama_model_n_embd(ptr)
        self.n_ctx_train = L.llama_model_n_ctx_train(ptr)
        self.head_dim = self.n_embd // self.n_head
        self.bos = L.llama_vocab_bos(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        tmpl = L.llama_model_chat_template(ptr, None)
        self.chat_template: bytes | None = tmpl if tmpl else None

    @property
    def offloaded(self) -> bool:
        """Whether layers were asked onto a GPU (``n_gpu_layers`` not 0): the CPU then idles while a decode runs."""
        return self.n_gpu_layers != 0

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str, add_bos: bool, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise _fail("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """Render chat messages with the model's template (ChatML when the model has none)."""
        tmpl = self.chat_template or b"chatml"
        arr = (L.llama_chat_message * len(messages))()
        keep = []
        for i, m in enumerate(messages):
            role, content = m["role"].encode(), m["content"].encode()
            keep += [role, content]
            arr[i].role, arr[i].content = role, content
        size = sum(len(k) for k in keep) * 2 + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = L.llama_chat_apply_template(tmpl, arr, len(messages), True, buf, size)
            if n < 0:
                raise ModelError("the model's chat template is not supported by llama.cpp; use --raw")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
        raise ModelError("chat template output kept growing")  # pragma: no cover


@dataclass(frozen=True)
class ContextConfig:
    """How a llama.cpp context is made: cells, batch, attention kernel and cache type."""

    n_ctx: int
    n_batch: int = 512
    flash_attn: bool = False
    type_k: int = 1  # GGML_TYPE_F16
    type_v: int = 1
    n_threads: int = 0  # 0 = every core
    host_ops: bool = False  # every op on the CPU: no layer's work sent to a GPU (llama.cpp's op_offload) when the
    # weights stay in host memory, so that recall finds the queries and the cache it writes in host memory


DECODE_SPIN_NS = 50_000_000
"""How long the decode thread and a caller waiting for it spin before they sleep (native/decoder.c), with layers on a
GPU: longer than a token's decode, so neither sleeps while tokens come. Measured on an H100 host (LLaMA-3-8B shape,
16k, 256-token replies, one process): every decode through the thread, one after the other, 126.2 tok/s with a 2 ms
spin against 132.2 without the thread (a slept thread took about 0.35 ms a token to wake); beside the policy's hooks
126.7 with 2 ms and 136.5 with 50 ms (docs/gpu.md, thirty-third session)."""


class Context:
    """One llama.cpp context with a unified KV cell pool shared by sequence 0 and a scratch sequence."""

    def __init__(self, model: Model, cfg: ContextConfig, cb_eval: object | None = None, cb_user: object | None = None,
                 threaded: bool = False) -> None:
        self.model = model
        p = L.llama_context_default_params()
        p.n_ctx = cfg.n_ctx
        p.n_batch = p.n_ubatch = min(cfg.n_batch, cfg.n_ctx)
        p.n_seq_max = 2
        p.kv_unified = True
        p.flash_attn_type = 1 if cfg.flash_attn else 0
        p.type_k, p.type_v = cfg.type_k, cfg.type_v
        p.n_threads = p.n_threads_batch = cfg.n_threads or default_threads()
        p.no_perf = True
        if cfg.host_ops:
            p.op_offload = False
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = cb_user
        self._cb = (cb_eval, cb_user)  # keep the ctypes thunk and its state alive as long as the context
        ptr = L.llama_init_from_model(model.ptr, p)
        if not ptr:
            raise _fail(f"could not create a llama.cpp context with {cfg.n_ctx} cells")
        self._ptr = ptr
        self._decoder: int | None = None  # the native decode thread (:meth:`launch`), made at the first launch
        self._inflight = False
        self.threaded = threaded and _decoder_lib() is not None  # every decode on the native decode thread
        self._launched_at = 0  # the first position of the decode in flight
        self._queued: list[Callable[[], None]] = []  # calls that wait for the decode in flight (:meth:`_later`)
        self._renumbered = self._reroping = False  # a seq_add since the last launch / before the decode in flight
        self.failed_at: int | None = None  # the first position of a launched decode that failed
        self.cfg = cfg
        self.n_ctx = L.llama_n_ctx(ptr)
        self.n_batch = L.llama_n_ubatch(ptr)
        self._mem = L.llama_get_memory(ptr)
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._n_vocab = model.n_vocab
        self._pinned = model.offloaded and os.environ.get("ASRKF_EDGE_STAGING", "1") != "0"
        self._reuse = os.environ.get("ASRKF_EDGE_STAGING", "1") != "0"
        self._stage = Reused(self._pinned)  # state copies out (pinned with a GPU)
        self._blob = Reused(self._pinned)  # blobs built for state_set, uploaded from where they are built

    @property
    def ptr(self) -> int | None:
        """The ``llama_context *``, once no decode is in flight: every llama.cpp call on the context goes through it."""
        if self._inflight:
            self.wait()
        return self._ptr

    @property
    def mem(self) -> int:
        """The context's ``llama_memory_t``, once no decode is in flight."""
        if self._inflight:
            self.wait()
        return self._mem

    def close(self) -> None:
        if self._decoder is not None:
            self._inflight, self._queued = False, []  # a decode's error and what waited for it are moot now
            _decoder_lib().asrkf_decoder_free(self._decoder)
            self._decoder = None
        self._stage.drop()  # views handed out keep their memory alive
        self._blob.drop()
        if self._ptr:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ptr)
            self._ptr = None

    def _fill(self, tokens: Sequence[int], pos0: int, seq: int, all_logits: bool) -> None:
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"batch of {n} tokens; 1..{self.n_batch} allowed")
        b = self._batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = all_logits or i == n - 1

    def decode(self, tokens: Sequence[int], pos0: int, seq: int = 0, all_logits: bool = False) -> None:
        """Decode one batch (at most ``n_batch`` tokens) at consecutive positions from ``pos0``."""
        if self.threaded:
            self.launch(tokens, pos0, seq, all_logits)
            self.wait()
            return
        ptr = self.ptr
        self._fill(tokens, pos0, seq, all_logits)
        rc = L.llama_decode(ptr, self._batch)
        if rc != 0:
            raise _fail(f"llama_decode failed (code {rc}) at position {pos0}")

    def launch(self, tokens: Sequence[int], pos0: int, seq: int = 0, all_logits: bool = False) -> None:
        """Start :meth:`decode` on the context's decode thread (``threaded``) and return at once; every other call on
        the context (through :attr:`ptr`, :attr:`mem` or :meth:`wait`) waits for it, and its error is raised there.
        Otherwise the decode runs here (the same result, nothing beside it). A threaded context decodes every batch on
        that one thread: each thread that calls llama.cpp's CPU backend keeps its own OpenMP team."""
        if not self.threaded:
            self.decode(tokens, pos0, seq, all_logits)
            return
        lib = _decoder_lib()
        ptr = self.ptr
        self._fill(tokens, pos0, seq, all_logits)
        if self._decoder is None:
            spin = DECODE_SPIN_NS if self.model.offloaded else 0  # no spinning beside CPU decodes
            self._decoder = lib.asrkf_decoder_new(ctypes.cast(L._lib.llama_decode, ctypes.c_void_p), ptr, spin)
            if not self._decoder:
                raise LlamaError("could not start the decode thread")
        if lib.asrkf_decoder_launch(self._decoder, ctypes.byref(self._batch)) != 0:
            raise LlamaError("internal error: a decode launched while another is in flight")
        self._inflight, self._launched_at, self.failed_at = True, pos0, None
        self._reroping, self._renumbered = self._renumbered, False

    def wait(self) -> None:
        """Wait for the decode :meth:`launch` started, if any; raises its error."""
        if not self._inflight:
            return
        self._inflight = False
        rc = _decoder_lib().asrkf_decoder_wait(self._decoder)
        queued, self._queued = self._queued, []
        for call in queued:  # a failed decode's cells are gone: the calls made beside it still apply
            call()
        if rc != 0:
            self.failed_at = self._launched_at
            raise _fail(f"llama_decode failed (code {rc}) at position {self._launched_at}")

    def decode_span(self) -> tuple[int, int] | None:
        """When the last decode waited for on the decode thread began and ended (``time.monotonic_ns``'s clock); None
        without that thread. Benchmarks' timelines read it: the GPU idles from one's end to the next launch."""
        if not self.threaded or self._decoder is None:
            return None
        span = (ctypes.c_int64 * 2)()
        _decoder_lib().asrkf_decoder_span(self._decoder, span)
        return int(span[0]), int(span[1])

    def synchronize(self) -> None:
        """Wait until llama.cpp's queued work on its backends is done."""
        L.llama_synchronize(self.ptr)

    def wait_rows(self, below: int) -> None:
        """Before a read of the cache's rows of positions below ``below`` on a stream of the reader's own (the gather):
        a decode in flight that writes none of them goes on; otherwise what llama.cpp has queued is finished
        (:meth:`synchronize`). The rows a decode waited for wrote are in place: with a capture callback llama.cpp
        synchronises after each graph view, so its decode returned only when the device was done. A decode after a
        renumbering (:meth:`seq_add`) first re-rotates every cell's K: then the read waits."""
        if not (self._inflight and self._cb[0] is not None and below <= self._launched_at and not self._reroping):
            self.synchronize()

    def logits(self, i: int = -1, copy: bool = True) -> np.ndarray:
        """The float32 logits of output row ``i`` of the last decode: a copy, or (``copy=False``) a read-only view of
        llama.cpp's buffer, valid until the next decode (a copy of 128k logits cost 0.07 ms on an H100's host)."""
        ptr = L.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise _fail(f"no logits for output {i}")
        out = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        if copy:
            return out.copy()
        out.flags.writeable = False
        return out

    # memory (sequence) operations
    def _later(self, call: Callable[[], None]) -> None:
        """Make ``call`` (a llama.cpp call on the cells' bookkeeping that returns nothing the caller reads) now, or,
        while a decode is in flight, once it is done: queued calls run in order before any other call reaches llama.cpp
        (every other goes through :attr:`ptr`, :attr:`mem` or :meth:`wait`, which runs the queue). A thaw beside a
        decode thus frees its room and builds its blob while the device computes; only its upload waits."""
        if self._inflight:
            self._queued.append(call)
        else:
            call()

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        def rm() -> None:
            if not L.llama_memory_seq_rm(self._mem, seq, p0, p1):
                raise _fail(f"llama_memory_seq_rm({seq}, {p0}, {p1}) failed")
        self._later(rm)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._later(lambda: L.llama_memory_seq_cp(self._mem, src, dst, p0, p1))

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Renumber positions in [p0, p1) by ``delta`` (K is re-rotated lazily at the next decode)."""
        self._renumbered = True
        self._later(lambda: L.llama_memory_seq_add(self._mem, seq, p0, p1, delta))

    def seq_pos_max(self, seq: int) -> int:
        return L.llama_memory_seq_pos_max(self.mem, seq)

    def clear(self) -> None:
        L.llama_memory_clear(self.mem, True)

    # sequence state
    def staging(self, nbytes: int) -> np.ndarray:
        """Host memory of ``nbytes`` for a state copy: page-locked when layers are on a GPU, and reused
        (no fresh pages to fault in) unless a view returned earlier is still alive somewhere."""
        return self._stage.get(nbytes) if self._reuse else host_array(nbytes, self._pinned)

    def blob_buffer(self, nbytes: int) -> np.ndarray:
        """Reused memory of ``nbytes`` (page-locked with a GPU) to build a blob for :meth:`state_set` in (not
        zeroed). A fresh zeroed array per thaw faulted its pages in while the rows were copied: on the CPU,
        400-token thaws went from 2.2 to 3.3-3.7 GB/s without them (docs/RESULTS.md, seventh session). Callers land
        at most ``BLOB_REUSE_MAX`` bytes a blob (:meth:`Session._land`)."""
        if not self._reuse or nbytes > BLOB_REUSE_MAX:
            return np.empty(nbytes, np.uint8)
        return self._blob.get(nbytes)

    def state_get(self, seq: int) -> np.ndarray:
        """The serialized KV of sequence ``seq`` (cells in cell order), as a uint8 array.

        The array is staging memory (see :meth:`staging`): valid for as long as the caller holds it."""
        size = L.llama_state_seq_get_size(self.ptr, seq)
        buf = self.staging(size)
        n = L.llama_state_seq_get_data(self.ptr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq)
        if n != size:
            raise _fail(f"llama_state_seq_get_data wrote {n} of {size} bytes")
        return buf

    def state_set(self, blob: np.ndarray, seq: int) -> None:
        """Load a serialized sequence into ``seq`` (llama.cpp first empties ``seq``)."""
        blob = np.ascontiguousarray(blob, dtype=np.uint8)
        n = L.llama_state_seq_set_data(
            self.ptr, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), blob.nbytes, seq
        )
        if n != blob.nbytes:
            raise _fail(f"llama_state_seq_set_data read {n} of {blob.nbytes} bytes")


@cache
def _decoder_lib() -> ctypes.CDLL | None:
    """The native library with its decode thread's signatures, or None (not built, not POSIX, or disabled)."""
    lib = native.load()
    if lib is None or not hasattr(lib, "asrkf_decoder_new"):
        return None
    vp = ctypes.c_void_p
    for name, args, res in [("asrkf_decoder_new", [vp, vp, ctypes.c_int64], vp),
                            ("asrkf_decoder_launch", [vp, vp], ctypes.c_int32),
                            ("asrkf_decoder_wait", [vp], ctypes.c_int32), ("asrkf_decoder_free", [vp], None),
                            ("asrkf_decoder_span", [vp, ctypes.POINTER(ctypes.c_int64)], None)]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


class Sampler:
    """llama.cpp's sampler chain: greedy at temperature 0, else top-k, top-p, temperature, seeded draw."""

    def __init__(self, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, seed: int | None = None):
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if temperature <= 0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_k(top_k))
            if 0 < top_p < 1:
                L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_p(top_p, 1))
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_temp(temperature))
            s = 0xFFFFFFFF if seed is None else seed & 0xFFFFFFFF  # LLAMA_DEFAULT_SEED = random
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_dist(s))

    def sample(self, ctx: Context) -> int:
        tok = L.llama_sampler_sample(self.ptr, ctx.ptr, -1)
        return int(tok)

    def close(self) -> None:
        if self.ptr:
            L.llama_sampler_free(self.ptr)
            self.ptr = None


# Host staging memory for llama.cpp's state copies. A device-to-host copy into ordinary (pageable) memory
# goes through the driver's bounce buffer and first-touch page faults; one into page-locked memory is a
# single DMA. ggml's host buffer type of a GPU device (cudaMallocHost on CUDA) gives such memory.

_exiting = False


@atexit.register
def _mark_exit() -> None:  # the CUDA runtime may be going away: leak pinned buffers instead of freeing
    global _exiting
    _exiting = True


def extra_buffers() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types. Not where the CPU has AMX: there
    the AMX matmul segfaulted on the first batch of more than a few tokens (this project's 2-core Xeon with
    AMX, llama-cpp-python 0.3.36; upstream llama.cpp #20824, fix pending in #26954), while without the AMX
    buffer the same build decoded. ``ASRKF_EDGE_EXTRA_BUFFERS=1`` or ``0`` decides instead."""
    forced = os.environ.get("ASRKF_EDGE_EXTRA_BUFFERS")
    if forced in ("0", "1"):
        return forced == "1"
    fn = getattr(ggml_lib(), "ggml_cpu_has_amx_int8", None)
    if fn is None:
        return True
    fn.argtypes, fn.restype = [], ctypes.c_int
    if fn():
        log.info("CPU with AMX: weights stay in plain CPU buffers (llama.cpp's AMX matmul crashes, #20824)")
        return False
    return True


class TensorHead(ctypes.Structure):
    """The leading fields of ggml's ``struct ggml_tensor`` (stable across ggml versions)."""

    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int32)]


class Tensor(ctypes.Structure):
    """``struct ggml_tensor`` up to its name (GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10; checked against
    ``ggml_get_name`` before a source is read)."""

    _fields_ = [*TensorHead._fields_, ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
                ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


class GgmlInitParams(ctypes.Structure):
    """ggml's ``struct ggml_init_params`` (passed by value to ``ggml_init``)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def ggml_lib() -> ctypes.CDLL:
    """ggml's library, with the signature of every function this package calls through ctypes set in one place."""
    from llama_cpp import _ggml as ggml_bindings

    lib = ggml_bindings.libggml
    vp, sz, i64, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int
    for name, args, res in [
        ("ggml_backend_dev_count", [], sz), ("ggml_backend_dev_get", [sz], vp), ("ggml_backend_dev_type", [vp], i32),
        ("ggml_backend_dev_name", [vp], ctypes.c_char_p), ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_host_buffer_type", [vp], vp),
        ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        ("ggml_backend_buft_alloc_buffer", [vp, sz], vp), ("ggml_backend_buffer_get_base", [vp], vp),
        ("ggml_backend_buffer_free", [vp], None),
        # the capture callback's and the gather's
        ("ggml_get_name", [vp], ctypes.c_char_p), ("ggml_op_name", [i32], ctypes.c_char_p),
        ("ggml_backend_tensor_get", [vp, vp, sz, sz], None), ("ggml_backend_tensor_set", [vp, vp, sz, sz], None),
        ("ggml_init", [GgmlInitParams], vp), ("ggml_free", [vp], None), ("ggml_tensor_overhead", [], sz),
        ("ggml_graph_overhead", [], sz), ("ggml_new_tensor_1d", [vp, i32, i64], vp),
        ("ggml_new_tensor_2d", [vp, i32, i64, i64], vp), ("ggml_get_rows", [vp, vp, vp], vp),
        ("ggml_new_graph", [vp], vp), ("ggml_build_forward_expand", [vp, vp], None),
        ("ggml_backend_tensor_alloc", [vp, vp, vp], i32), ("ggml_backend_alloc_ctx_tensors", [vp, vp], vp),
        ("ggml_backend_graph_compute", [vp, vp], i32), ("ggml_backend_buffer_get_type", [vp], vp),
        ("ggml_backend_buft_get_device", [vp], vp), ("ggml_backend_dev_by_type", [i32], vp),
        ("ggml_backend_dev_init", [vp, ctypes.c_char_p], vp), ("ggml_backend_free", [vp], None),
        ("ggml_backend_supports_op", [vp, vp], ctypes.c_bool), ("ggml_backend_buffer_is_host", [vp], ctypes.c_bool),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


_GPU_TYPES = (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


def gpu_devices() -> list[int]:
    """Raw ``ggml_backend_dev_t`` handles of the GPU devices llama.cpp was built with (none on a CPU build)."""
    lib = ggml_lib()
    devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    return [d for d in devs if lib.ggml_backend_dev_type(d) in _GPU_TYPES]


def cuda_graphs() -> bool:
    """Whether llama.cpp runs its GPU layers through CUDA, which replays each graph view as a CUDA graph keyed by
    its first node (a capture must then cut every decode alike; Metal and the others keep no such graphs)."""
    return any(ggml_lib().ggml_backend_dev_name(d).decode().startswith("CUDA") for d in gpu_devices())


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a device's memory, as its backend reports them."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    ggml_lib().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def gpu_names() -> list[str]:
    """Each GPU device as its backend describes it (e.g. "NVIDIA H200"); none on a CPU build."""
    return [ggml_lib().ggml_backend_dev_description(d).decode() for d in gpu_devices()]


def gpu_memory_used() -> int:
    """Bytes in use on all GPU devices (total minus free, the driver's context included); 0 without one."""
    return sum(total - free for free, total in map(device_memory, gpu_devices()))


def host_array(nbytes: int, pinned: bool) -> np.ndarray:
    """A uint8 array of ``nbytes``: page-locked through the first GPU's host buffer type when ``pinned`` and
    one exists, else ordinary memory. Pinned memory is given back when the array and its views are gone."""
    buft = None
    if pinned and pinned_available():
        lib = ggml_lib()
        buft = lib.ggml_backend_dev_host_buffer_type(gpu_devices()[0])
    if not buft:
        return np.empty(nbytes, np.uint8)
    buf = lib.ggml_backend_buft_alloc_buffer(buft, nbytes)
    if not buf:
        return np.empty(nbytes, np.uint8)
    raw = (ctypes.c_uint8 * nbytes).from_address(lib.ggml_backend_buffer_get_base(buf))
    raw.owner = _Free(buf)  # frees the ggml buffer when the ctypes object (the array's base) dies
    return np.frombuffer(raw, np.uint8)


# Bytes of the largest blob built in reused memory: thaws land in parts of half of it, the rest room for padding cells
# (a part of 256 tokens of the LLaMA-3-8B shape is 32 MB; a decode-time thaw of 64 tokens, 8.4 MB).
BLOB_REUSE_MAX = 64 << 20


class Reused:
    """One host buffer (page-locked when ``pinned``) handed out again and again (its pages stay faulted in), grown
    by doubling; a new one is made only while a view of the last is still alive somewhere (its reference count says
    so)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._buf: np.ndarray | None = None
        self._refs = 0

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf is None or self._buf.nbytes < nbytes or sys.getrefcount(self._buf) > self._refs:
            old = 0 if self._buf is None else self._buf.nbytes
            cap = max(nbytes, 1 << 20, 2 * old if nbytes > old else old)
            self._buf = None
            self._buf = host_array(cap, self.pinned)
            self._refs = sys.getrefcount(self._buf)
        return self._buf[:nbytes]

    def drop(self) -> None:
        self._buf = None


class _Free:
    def __init__(self, buf: int) -> None:
        self.buf = buf

    def __del__(self) -> None:
        if not _exiting:
            ggml_lib().ggml_backend_buffer_free(self.buf)


@cache
def pinned_available() -> bool:
    """True when llama.cpp has a GPU whose backend offers page-locked host buffers (and staging is not off)."""
    if os.environ.get("ASRKF_EDGE_PINNED", "1") == "0":
        return False
    try:
        devs = gpu_devices()
    except (OSError, AttributeError, ImportError):
        return False
    return bool(devs) and bool(ggml_lib().ggml_backend_dev_host_buffer_type(devs[0]))
