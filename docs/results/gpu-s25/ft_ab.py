"""Freeze/thaw µs a token on a GPU (twenty-fifth session), variants in one process. From a tree's root:
PYTHONPATH=/tmp/site:. python3 ft_ab.py MODEL default[,pageable,t1] [prof]
(pageable: thaw blobs in ordinary memory; t1: row copies on one thread; prof: a cProfile of each path after)."""

# ruff: noqa: E402, I001
import llama_cpp  # noqa: F401  (before numpy, as the benchmarks do)

import cProfile
import io
import json
import pstats
import sys

sys.path.insert(0, "benchmarks")
from freeze_thaw import measure

import asrkf_edge.llama as llama_mod
from asrkf_edge import Engine, kvcopy
from asrkf_edge.capture import CaptureSpec

model, variants = sys.argv[1], sys.argv[2].split(",")
out: dict[str, list[tuple[float, float, float, float]]] = {}
orig_init = llama_mod.Context.__init__


def pageable_init(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
    orig_init(self, *a, **k)
    self._blob = llama_mod.Reused(False)


with Engine.load(model, n_gpu_layers=-1, flash_attn=True) as eng:
    cap = {"capture": CaptureSpec(tuple(range(eng.model.n_layer)), window=8, probs=False)}
    measure(eng, 1200, 400, 3)  # warm
    for _ in range(2):
        for v in variants:
            threads = kvcopy.__dict__.get("_THREADS")
            if v == "pageable":
                llama_mod.Context.__init__ = pageable_init
            if v == "t1":
                kvcopy._THREADS = 1
            for gather in (False, True):
                r = measure(eng, 1200, 400, 10, **(cap if gather else {}))
                bpt = r["store_bytes_per_token"]
                f_us, t_us = r["freeze_us_per_token"], r["thaw_us_per_token"]
                out.setdefault(f"{v}{'-gather' if gather else ''}", []).append(
                    (round(f_us, 1), round(bpt / f_us / 1e3, 2), round(t_us, 1), round(bpt / t_us / 1e3, 2)))
            llama_mod.Context.__init__ = orig_init
            if threads is not None:
                kvcopy._THREADS = threads
    print(json.dumps({"model": model, "cols": "freeze us/tok, GB/s, thaw us/tok, GB/s", **out}, indent=1))
    if "prof" in sys.argv[3:]:
        for gather in (False, True):
            pr = cProfile.Profile()
            pr.enable()
            measure(eng, 1200, 400, 10, **(cap if gather else {}))
            pr.disable()
            text = io.StringIO()
            pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(14)
            print("gather" if gather else "state", text.getvalue())
