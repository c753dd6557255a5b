"""What a gather on the device would buy for scattered copies out of the KV cache (issue 15): every layer's K rows
of N scattered active cells, copied to the host three ways, bytes checked equal, median ms of ``--repeat``:

- ``peek``: the state API, as Session.peek does (cells copied to the scratch sequence, llama_state_seq_get_data:
  one ggml_backend_tensor_get per run of cells, layer, K and V, then parsed);
- ``rows``: one ggml_backend_tensor_get per run of cells and layer, K only, from Python;
- ``gather``: asrkf_edge.gather.RowGather, one ggml graph of get_rows per layer computed by a backend of the
  cache's own device (the cache's rows seen as int32, so any cache type moves as raw bytes) into one buffer, then
  one copy to the host. Its graph is made once for N and reused (``gather_first_ms``: the first call, with it).

A freeze moves V as well (the same count of copies again): the per-copy cost is what a gather removes.

Usage: python benchmarks/device_gather.py [--model M] [--gpu-layers -1] [--cells 60] [--repeat 30] [--context 3000]
"""

# ruff: noqa: I001, E402
from __future__ import annotations

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted loading a model otherwise)

import argparse
import json
import platform
import time

import numpy as np

from asrkf_edge import Engine
from asrkf_edge.capture import CaptureSpec
from asrkf_edge.gather import RowGather
from asrkf_edge.llama import ggml_lib
from asrkf_edge.session import Session

def per_run(tensors: list[tuple[int, int, int]], cells: np.ndarray) -> list[np.ndarray]:
    """Each layer's rows of ``cells``, one ggml_backend_tensor_get per run of consecutive cells."""
    get = ggml_lib().ggml_backend_tensor_get
    cut = np.flatnonzero(np.diff(cells) != 1) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(cells)]])
    out = []
    for tensor, _, row in tensors:
        buf = np.empty((len(cells), row), np.uint8)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            get(tensor, buf.ctypes.data + a * row, int(cells[a]) * row, (b - a) * row)
        out.append(buf)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--cells", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--context", type=int, default=3000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with Engine.load(a.model, n_gpu_layers=a.gpu_layers, flash_attn=True) as eng:
        spec = CaptureSpec(tuple(range(eng.model.n_layer)), window=8, probs=False)
        with Session(eng.model, a.context + 256, flash_attn=True, capture=spec) as s:
            s.eval([int(t) for t in rng.integers(300, eng.model.n_vocab, a.context)])
            found = s.capture.cache_tensors()
            if found is None:
                raise SystemExit("the capture did not find llama.cpp's KV cache tensors")
            tensors = found[: eng.model.n_layer]  # every layer's K
            gather = RowGather([t for t, _, _ in tensors], s.ctx.n_ctx)
            times: dict[str, list[float]] = {"peek": [], "rows": [], "gather": []}
            for _ in range(a.repeat):
                act = s.active_positions()
                pos = np.sort(rng.choice(act, a.cells, replace=False))
                cells = s.cells_of(pos)
                t0 = time.perf_counter()
                parsed = s.peek(pos)
                t1 = time.perf_counter()
                rows = per_run(tensors, cells)
                t2 = time.perf_counter()
                gathered = gather(cells)
                t3 = time.perf_counter()
                for name, dt in (("peek", t1 - t0), ("rows", t2 - t1), ("gather", t3 - t2)):
                    times[name].append(dt)
                by_pos = {int(p): j for j, p in enumerate(parsed.pos)}
                theirs = [by_pos[int(p)] for p in pos]  # both others are in ``pos`` order
                for layer in range(eng.model.n_layer):
                    want = parsed.k[layer][theirs]
                    if not (np.array_equal(rows[layer], want) and np.array_equal(gathered[layer], want)):
                        raise SystemExit(f"bytes differ at layer {layer}")
            device = gather.device
            gather.close()
    print(json.dumps({"machine": platform.machine(), "model": a.model or "default", "device": device, "cells": a.cells,
                      "layers": len(tensors), "row_bytes": tensors[0][2], "repeat": a.repeat,
                      **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in times.items()},
                      "gather_first_ms": 1e3 * float(times["gather"][0])}))


if __name__ == "__main__":
    main()
