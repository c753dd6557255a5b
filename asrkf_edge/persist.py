"""Write a state tree to a directory and read it back: the file side of saving a chat.

Objects describe themselves with ``state()`` (nested dicts of JSON values, NumPy arrays and
:class:`~pathlib.Path` s of files to carry along) and take it back with ``load_state`` /
``from_state``; this module only stores such a tree. A save directory holds ``manifest.json`` (the tree
with arrays and files left out, plus the format name and version), ``arrays.npz`` (every array under its
dotted key) and ``files/`` (the carried files, hard-linked when possible). :data:`VERSION` changes only
when someone changes what the tree holds; a save of a version not in :data:`READS` is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SessionFileError
from .store import link_or_copy
from .version import __version__

FORMAT = "asrkf-edge-chat"
VERSION = 3  # 1: before the state() refactor (files active.kv and store/, flat scalars); 2: a store of 16-token segments
READS = (2, 3)  # the store takes format 2's segments back into slots
_FILE = "$file"


def write(path: Path, tree: dict[str, Any]) -> Path:
    """Store ``tree`` in directory ``path``, replacing an earlier save there atomically (never another directory)."""
    path = path.resolve()
    if path.exists() and not (path / "manifest.json").exists() and (not path.is_dir() or any(path.iterdir())):
        raise SessionFileError(f"{path} exists and is not a saved chat; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        arrays: dict[str, np.ndarray] = {}
        (tmp / "files").mkdir()
        manifest = {"format": FORMAT, "version": VERSION, "asrkf_edge": __version__,
                    **_split(tree, "", arrays, tmp / "files")}
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read(path: Path) -> dict[str, Any]:
    """The tree :func:`write` stored in ``path``; carried files come back as paths inside the save."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError as e:
        raise SessionFileError(f"{path} is not a saved chat (no manifest.json)") from e
    except (OSError, ValueError) as e:
        raise SessionFileError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SessionFileError(f"{path} is not an asrkf-edge saved chat")
    if manifest.get("version") not in READS:
        raise SessionFileError(f"{path} was saved in chat format version {manifest.get('version')} "
                               f"(asrkf-edge {manifest.get('asrkf_edge')}); this asrkf-edge reads versions "
                               f"{', '.join(map(str, READS))}")
    try:
        with np.load(path / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise SessionFileError(f"{path}: unreadable arrays.npz ({e})") from e
    tree = _files(manifest, path / "files")
    for key, value in arrays.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _split(tree: dict[str, Any], prefix: str, arrays: dict[str, np.ndarray], files: Path) -> dict[str, Any]:
    """The JSON part of ``tree``: arrays go to ``arrays`` under dotted keys, files are linked into ``files``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if "." in key:
            raise ValueError(f"state key {key!r} may not contain '.'")
        if isinstance(value, np.ndarray):
            arrays[prefix + key] = value
        elif isinstance(value, Path):
            dst = files / value.name
            if dst.exists():
                raise ValueError(f"two carried files are named {value.name}")
            link_or_copy(value, dst)
            out[key] = {_FILE: value.name}
        elif isinstance(value, dict) and value:
            out[key] = _split(value, f"{prefix}{key}.", arrays, files)
        else:
            out[key] = value
    return out


def _files(node: Any, files: Path) -> Any:
    if isinstance(node, dict):
        if set(node) == {_FILE}:
            return files / node[_FILE]
        return {k: _files(v, files) for k, v in node.items()}
    return node
