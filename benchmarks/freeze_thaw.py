"""Freeze and thaw cost on the default model, native row copy vs its NumPy twin.

Usage: python benchmarks/freeze_thaw.py [--tokens 1200] [--range 400] [--repeat 20] [--flash-attn]
                                         [--scattered 60 --cells 768] [--gpu-layers -1] [--model PATH]
                                         [--gather]
(flash attention off, the engine's default, stores V transposed: every V element is moved alone)
Prints one JSON object (machine, per-token µs for each path, store bytes per token). ``--scattered K``
measures instead what a policy that follows its queries does every step: 2,000 tokens read into ``--cells``
cells, then ``--repeat`` swaps of K random scattered active tokens frozen and K random frozen ones thawed
(into the first free cells, as policies thaw): ms per freeze and thaw (median) and the store's file bytes.
``--gather``: sessions with a capture, as a policy's runner has, so that with flash attention a freeze gathers its
rows on the cache's device (asrkf_edge.gather) instead of going through llama.cpp's state API.
"""

# ruff: noqa: I001, E402
from __future__ import annotations

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted loading a model otherwise)

import argparse
import json
import platform
import time

import numpy as np

from asrkf_edge import Engine, kvcopy
from asrkf_edge.capture import CaptureSpec

TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def measure(engine: Engine, n_tokens: int, span: int, repeat: int, **kw: object) -> dict[str, float]:
    tokens = (engine.tokenize(TEXT * 200))[:n_tokens]
    freeze_s, thaw_s = [], []
    with engine.session(2048, **kw) as s:
        s.eval(tokens)
        for i in range(repeat):
            p0 = 100 + (i * 37) % (n_tokens - span - 200)
            t0 = time.perf_counter()
            s.freeze(p0, p0 + span)
            t1 = time.perf_counter()
            s.thaw(p0, p0 + span)
            t2 = time.perf_counter()
            freeze_s.append(t1 - t0)
            thaw_s.append(t2 - t1)
        bpt = s.bytes_per_token
    return {
        "freeze_us_per_token": float(np.median(freeze_s)) / span * 1e6,
        "thaw_us_per_token": float(np.median(thaw_s)) / span * 1e6,
        "store_bytes_per_token": bpt,
    }


def swaps(engine: Engine, k: int, cells: int, repeat: int, **kw: object) -> dict[str, float]:
    rng = np.random.default_rng(0)
    freeze_s, thaw_s = [], []
    with engine.session(cells, **kw) as s:
        s.eval(engine.tokenize(TEXT * 200)[:2000])
        for _ in range(repeat):
            act = s.active_positions()
            out = np.sort(rng.choice(act[~s.protected(act)], k, replace=False))
            back = np.sort(rng.choice(s.frozen_positions(), k, replace=False))
            t0 = time.perf_counter()
            s.freeze_positions(out)
            t1 = time.perf_counter()
            s.thaw_positions(back, packed=True)
            freeze_s.append(t1 - t0)
            thaw_s.append(time.perf_counter() - t1)
        assert s.store is not None
        return {"freeze_ms": float(np.median(freeze_s)) * 1e3, "thaw_ms": float(np.median(thaw_s)) * 1e3,
                "store_file_bytes": s.store.file_bytes, "frozen_tokens": s.n_frozen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1200)
    ap.add_argument("--range", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--scattered", type=int, default=0, help="swaps of this many scattered tokens instead")
    ap.add_argument("--cells", type=int, default=768)
    ap.add_argument("--gpu-layers", type=int, default=0, help="-1: every layer (and the KV cache) on the GPU")
    ap.add_argument("--model", default=None, help="a GGUF file instead of the default model")
    ap.add_argument("--gather", action="store_true", help="sessions with a capture: freezes gather on the device")
    a = ap.parse_args()
    native_built = kvcopy.native_available()
    with Engine.load(a.model, n_gpu_layers=a.gpu_layers, flash_attn=a.flash_attn) as eng:
        out: dict[str, object] = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                  "model": eng.info.name, "range_tokens": a.range, "flash_attn": a.flash_attn,
                                  "gpu_layers": a.gpu_layers, "gather": a.gather}
        kw = {"capture": CaptureSpec(tuple(range(eng.model.n_layer)), window=8, probs=False)} if a.gather else {}
        if a.scattered:
            out |= {"scattered": a.scattered, "cells": a.cells}
        for path, native in (("python", False), ("native", True))[: 1 + native_built]:
            kvcopy._lib = kvcopy._load_native() if native else None
            out[path] = (swaps(eng, a.scattered, a.cells, a.repeat, **kw) if a.scattered
                         else measure(eng, a.tokens, a.range, a.repeat, **kw))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
