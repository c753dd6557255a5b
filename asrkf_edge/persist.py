"""Save a :class:`~asrkf_edge.chat.Chat` to a directory and resume it, KV and frozen store included.

A save directory holds ``manifest.json`` (format version, model fingerprint, settings, messages, scalar
state), ``arrays.npz`` (tokens, the cell map, importance scores and key mirror, policy state, segment
indexes), ``active.kv`` (llama.cpp's state blob of sequence 0: the active KV) and ``store/`` (the frozen
segments, hard-linked when possible). Resume rebuilds the context with every active token in the cell it
occupied (attention sums in cell order, so this keeps logits bit-exact), so a resumed chat continues
exactly as the saved one does.

Before saving, llama.cpp's cell search start (``head``) is moved to the lowest free cell: a fresh
context can only reach that state, and the saved chat moves there too, so both continue identically.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from . import blob as blobfmt
from .cells import DUMMY_POS
from .errors import SessionFileError
from .kvcopy import blob_side, copy_rows, empty_blob
from .llama import SCRATCH_SEQ
from .policy import Policy, make_policy
from .recovery import Recovery
from .session import Session
from .store import FrozenStore, Segment

if TYPE_CHECKING:
    from .chat import Chat
    from .engine import Engine

log = logging.getLogger(__name__)

FORMAT = "asrkf-edge-chat"
VERSION = 1


def _scalars(obj: object) -> dict[str, object]:
    """Counters and flags of a session or runner: every attribute that is a number, a bool or None."""
    return {k: v for k, v in vars(obj).items() if v is None or isinstance(v, bool | int | float)}


def _set_scalars(obj: object, saved: dict[str, object]) -> None:
    """Restore :func:`_scalars`; attributes that hold objects now (made by the constructor) are left alone."""
    mine = _scalars(obj)
    for k, v in saved.items():
        if k in mine:
            setattr(obj, k, v)


def model_fingerprint(path: Path) -> str:
    """sha256 of the file size, its first and its last MiB: cheap, and different for any other GGUF."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def _effective_head(cells_seqs: np.ndarray, head: int) -> int:
    """llama.cpp's search start as it behaves: a head at or below the lowest free cell acts as that cell."""
    free = np.flatnonzero(cells_seqs == 0)
    return int(free[0]) if len(free) and head <= free[0] else head


def _normalize_head(sess: Session, layout: blobfmt.Layout) -> None:
    """Move llama.cpp's search start down to the lowest free cell (what a restore leaves), via dummy cells."""
    cells = sess.cells
    free = np.flatnonzero(cells.seqs == 0)
    if not len(free) or cells.head <= free[0]:
        return
    low = int(free[0])
    n = 1 if cells.head > cells.used + 2 else int(np.flatnonzero(cells.free_order(cells.head) == low)[0]) + 1
    pos = DUMMY_POS + np.arange(n, dtype=np.int64)
    sess.ctx.state_set(empty_blob(layout, pos, SCRATCH_SEQ), SCRATCH_SEQ)
    cells.apply(cells.find_slot(n), pos, SCRATCH_SEQ)
    sess.ctx.seq_rm(SCRATCH_SEQ, -1, -1)
    cells.seq_rm(SCRATCH_SEQ)
    if cells.head != low:
        raise SessionFileError(f"internal error: cell search start is {cells.head}, expected {low}")


def _policy_config(policy: Policy) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(policy):
        if f.init:
            v = getattr(policy, f.name)
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
    return out


def _policy_from(name: str, config: dict[str, object]) -> Policy:
    try:
        base = make_policy(name)
    except ValueError as e:
        raise SessionFileError(f"saved chat uses policy {name!r}, which this version does not have") from e
    kw: dict[str, object] = {}
    for key, value in config.items():
        default = getattr(base, key, None)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kw[key] = type(default)(**value)
        elif isinstance(value, list):
            kw[key] = tuple(value)
        else:
            kw[key] = value
    return make_policy(name, **kw)


def _policy_state(policy: Policy, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """Runtime state of the policy (non-init fields, e.g. AsrKf's ledger and entropy monitor)."""
    out: dict[str, dict[str, object]] = {}
    for f in dataclasses.fields(policy):
        if f.init:
            continue
        obj = getattr(policy, f.name)
        scalars: dict[str, object] = {}
        for k, v in vars(obj).items():
            if isinstance(v, np.ndarray):
                arrays[f"policy.{f.name}.{k}"] = v
            elif v is None or isinstance(v, bool | int | float | str):
                scalars[k] = v
            elif not dataclasses.is_dataclass(v):  # dataclasses are configuration, rebuilt from the config
                raise SessionFileError(f"cannot save policy state {f.name}.{k} of type {type(v).__name__}")
        out[f.name] = scalars
    return out


def _restore_policy_state(policy: Policy, state: dict[str, dict[str, object]], arrays: dict[str, np.ndarray]) -> None:
    for name, scalars in state.items():
        obj = getattr(policy, name)
        for k, v in scalars.items():
            setattr(obj, k, v)
    for key, value in arrays.items():
        if key.startswith("policy."):
            _, name, attr = key.split(".", 2)
            setattr(getattr(policy, name), attr, value.copy())


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_chat(chat: Chat, path: Path) -> Path:
    """Write ``chat`` to directory ``path`` (replaced atomically if it holds an earlier save)."""
    with chat.engine.lock:
        if chat._cached is None:
            raise SessionFileError("the chat's last turn failed midway; send a message or reset before saving")
        run, sess = chat.runner, chat.runner.session
        if len(sess.cells.cells_of(SCRATCH_SEQ)):
            raise SessionFileError("internal error: scratch sequence not empty")
        t0 = time.perf_counter()
        path = path.resolve()
        if path.exists() and not (path / "manifest.json").exists() and (not path.is_dir() or any(path.iterdir())):
            raise SessionFileError(f"{path} exists and is not a saved chat; not overwriting it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            arrays: dict[str, np.ndarray] = {}
            cells0 = sess.cells.cells_of(0)
            layout = None
            if len(cells0):
                raw = sess.ctx.state_get(0)
                parsed = blobfmt.parse(raw)
                if not np.array_equal(parsed.pos, sess.cells.pos[cells0]):
                    raise SessionFileError("internal error: KV cell map out of sync with llama.cpp")
                layout = parsed.layout
                raw.tofile(tmp / "active.kv")
                _normalize_head(sess, layout)
            arrays["cell_pos"], arrays["cell_seqs"] = sess.cells.pos.copy(), sess.cells.seqs.copy()
            arrays["tokens"] = np.asarray(sess.tokens, np.int32)
            arrays["chunks"] = np.asarray(sess._chunks, np.int64)
            left = sorted(sess._left.items())
            arrays["left"] = np.asarray(left, np.int64).reshape(len(left), 2)
            segments = []
            if sess.store is not None:
                (tmp / "store").mkdir()
                for seg in sess.store.segments():
                    _link(seg.path, tmp / "store" / seg.path.name)
                    arrays[f"seg.{seg.seg_id}.pos"], arrays[f"seg.{seg.seg_id}.tokens"] = seg.pos, seg.tokens
                    arrays[f"seg.{seg.seg_id}.live"] = seg.live
                    segments.append({"id": seg.seg_id, "file": seg.path.name, "crc": seg.crc, "nbytes": seg.nbytes})
            n = sess.n_logical
            if run.importance is not None:
                arrays["imp.scores"] = run.importance.scores[:n].copy()
                if run.importance.mirror_keys:
                    arrays["imp.keys"] = run.importance.keys[:, :n].copy()
            policy_state = _policy_state(run.policy, arrays)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "asrkf_edge": __version__,
                "model": {"name": chat.engine.info.name, "size": chat.model.path.stat().st_size,
                          "fingerprint": model_fingerprint(chat.model.path)},
                "flash_attn": chat.engine.flash_attn,
                "ctx": chat.ctx,
                "cells": chat.cells,
                "n_cells": sess.ctx.n_ctx,
                "name": chat.name,
                "turns": chat.turns,
                "resets": chat.resets,
                "sampling": dataclasses.asdict(chat.sampling),
                "messages": chat.messages,
                "cached": base64.b64encode(chat._cached).decode("ascii"),
                "policy": {"name": run.policy.name, "config": _policy_config(run.policy), "state": policy_state},
                "runner": {"scalars": _scalars(run), "recoveries": [r.as_dict() for r in run.recoveries]},
                "session": {"scalars": _scalars(sess), "head": sess.cells.head},
                "store": None if sess.store is None else {
                    "layout": dataclasses.asdict(sess.store.layout), "segments": segments},
                "active": {"tokens": int(len(cells0)), "layout": dataclasses.asdict(layout) if layout else None},
                "kv": chat.kv_stats(),
            }
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved chat (%d tokens, %d frozen) to %s in %.3f s", n, sess.kv_stats()["frozen_tokens"], path,
                 time.perf_counter() - t0)
        return path


def read_manifest(path: Path) -> dict[str, object]:
    """The manifest of a saved chat; :class:`SessionFileError` when it is not one or of another format version."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError as e:
        raise SessionFileError(f"{path} is not a saved chat (no manifest.json)") from e
    except (OSError, ValueError) as e:
        raise SessionFileError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SessionFileError(f"{path} is not an asrkf-edge saved chat")
    if manifest.get("version") != VERSION:
        raise SessionFileError(f"{path} was saved in chat format version {manifest.get('version')} "
                               f"(asrkf-edge {manifest.get('asrkf_edge')}); this asrkf-edge reads version {VERSION}")
    return manifest


def load_chat(engine: Engine, path: Path) -> Chat:
    """Resume a chat saved by :func:`save_chat` on ``engine`` (same model, same flash-attention setting)."""
    from .chat import Chat, Sampling

    t0 = time.perf_counter()
    manifest = read_manifest(path)
    model = manifest["model"]
    if model["fingerprint"] != model_fingerprint(engine.model.path):  # type: ignore[index]
        raise SessionFileError(f"{path} was saved with model {model['name']} ({model['size']} bytes); "  # type: ignore[index]
                               f"this engine runs {engine.info.name} ({engine.model.path.stat().st_size} bytes)")
    if bool(manifest["flash_attn"]) != engine.flash_attn:
        raise SessionFileError(f"{path} was saved with flash attention {'on' if manifest['flash_attn'] else 'off'}; "
                               "load the engine with the same setting")
    pol = manifest["policy"]
    policy = _policy_from(pol["name"], pol["config"])  # type: ignore[index]
    try:
        with np.load(path / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise SessionFileError(f"{path}: unreadable arrays.npz ({e})") from e
    chat = Chat(engine, policy=policy, ctx=int(manifest["ctx"]), cells=int(manifest["cells"]),  # type: ignore[arg-type]
                sampling=Sampling(**manifest["sampling"]), name=manifest.get("name"))  # type: ignore[arg-type]
    try:
        with engine.lock:
            _restore(chat, manifest, arrays, path)
    except BaseException:
        chat.close()
        raise
    log.info("resumed chat (%d tokens) from %s in %.3f s", chat.n_tokens, path, time.perf_counter() - t0)
    return chat


def _restore(chat: Chat, manifest: dict, arrays: dict[str, np.ndarray], path: Path) -> None:
    run, sess = chat.runner, chat.runner.session
    if sess.ctx.n_ctx != manifest["n_cells"]:
        raise SessionFileError(f"{path}: saved with {manifest['n_cells']} KV cells, this context has {sess.ctx.n_ctx}")
    saved_pos, saved_seqs = arrays["cell_pos"], arrays["cell_seqs"]
    cells0 = np.flatnonzero(saved_seqs & 1)
    if len(cells0):
        raw = np.fromfile(path / "active.kv", np.uint8)
        try:
            parsed = blobfmt.parse(raw)
        except ValueError as e:
            raise SessionFileError(f"{path}: active.kv is damaged ({e})") from e
        if not np.array_equal(parsed.pos, saved_pos[cells0]):
            raise SessionFileError(f"{path}: active.kv does not match the saved cell map")
        layout = parsed.layout
        order = sess.cells.plan_restore(cells0)  # per blob cell: index into cells0, or -1 (padding)
        n, real = len(order), order >= 0
        pos = np.where(real, saved_pos[cells0][np.maximum(order, 0)], DUMMY_POS + np.arange(n))
        blob = empty_blob(layout, pos, SCRATCH_SEQ)
        copy_rows(blob_side(raw, layout, len(cells0)), blob_side(blob, layout, n), order[real], np.flatnonzero(real), layout)
        sess.ctx.state_set(blob, SCRATCH_SEQ)
        landed = sess.cells.find_slot(n)
        if not np.array_equal(landed[real], cells0[order[real]]):
            raise SessionFileError("internal error: restored cells would not land where they were")
        sess.cells.apply(landed, pos, SCRATCH_SEQ)
        sess.ctx.seq_cp(SCRATCH_SEQ, 0, 0, DUMMY_POS)
        sess.cells.seq_cp(SCRATCH_SEQ, 0, 0, DUMMY_POS)
        sess.ctx.seq_rm(SCRATCH_SEQ, -1, -1)
        sess.cells.seq_rm(SCRATCH_SEQ)
    if not (np.array_equal(sess.cells.seqs, saved_seqs) and np.array_equal(sess.cells.pos, saved_pos)):
        raise SessionFileError("internal error: restored cell map differs from the saved one")
    saved_head = int(manifest["session"]["head"])
    if _effective_head(saved_seqs, saved_head) != _effective_head(sess.cells.seqs, sess.cells.head):
        log.warning("resumed cell search start %d differs from the saved %d: later cells may differ", sess.cells.head, saved_head)
    sess.tokens = arrays["tokens"].astype(np.int64).tolist()
    sess._chunks = arrays["chunks"].tolist()
    sess._left = {int(p): int(c) for p, c in arrays["left"].tolist()}
    _set_scalars(sess, manifest["session"]["scalars"])
    st = manifest["store"]
    if st is not None:
        sess.store = FrozenStore(blobfmt.Layout(**st["layout"]), sess._store_dir, sess._keep)
        for s in st["segments"]:
            src = path / "store" / s["file"]
            if not src.exists() or src.stat().st_size != s["nbytes"]:
                raise SessionFileError(f"{path}: frozen segment {s['file']} is missing or truncated")
            dst = sess.store.dir / s["file"]
            _link(src, dst)
            seg = Segment(int(s["id"]), dst, arrays[f"seg.{s['id']}.pos"].astype(np.int64),
                          arrays[f"seg.{s['id']}.tokens"].astype(np.int32), int(s["crc"]), int(s["nbytes"]))
            seg.live = arrays[f"seg.{s['id']}.live"].astype(bool).copy()
            sess.store.adopt(seg)
    n = sess.n_logical
    imp = run.importance
    if imp is not None and "imp.scores" in arrays:
        imp._grow(n)
        imp.scores[:n] = arrays["imp.scores"]
        if imp.mirror_keys and "imp.keys" in arrays:
            imp.keys[:, :n] = arrays["imp.keys"]
    r = manifest["runner"]
    _set_scalars(run, r["scalars"])
    run.recoveries = [Recovery(**{**d, "ranges": [tuple(x) for x in d["ranges"]]}) for d in r["recoveries"]]
    _restore_policy_state(run.policy, manifest["policy"]["state"], arrays)
    chat.messages = list(manifest["messages"])
    chat._cached = base64.b64decode(manifest["cached"])
    chat.turns, chat.resets = int(manifest["turns"]), int(manifest["resets"])
