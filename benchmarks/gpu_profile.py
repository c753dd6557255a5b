"""cProfile of asrkf's decode with every layer on the GPU: where a decoded token's time goes.

Usage: python benchmarks/gpu_profile.py MODEL.gguf LENGTH DECODE   (e.g. /tmp/m/llama8b.gguf 16384 32)

Random token ids as the prompt (works for the random-weight models of gpu_make_model.py); one unrecorded
2,048-token run first, so Numba's compilation stays out of the profile. Prints the prefill and decode rates,
the freeze/thaw time and events, then the profile by own time and by cumulative time.
"""

# ruff: noqa: I001, E402
from __future__ import annotations

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted loading a model otherwise)

import cProfile
import pstats
import sys
import time

import numpy as np

from asrkf_edge import Engine
from asrkf_edge.policies import make_policy
from asrkf_edge.runner import budget_cells


def main() -> None:
    path, length, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Engine.load(path, n_gpu_layers=-1, flash_attn=True) as eng:
        rng = np.random.default_rng(0)
        for n, nd, report in ((2048, 4, False), (length, n_decode, True)):
            toks = [int(t) for t in rng.integers(300, eng.model.n_vocab, n)]
            pol = make_policy("asrkf")
            with eng.runner(pol, budget_cells(pol, 0.35, n, nd)) as run:
                t = time.perf_counter()
                run.prefill(toks)
                prefill = time.perf_counter() - t
                st0, tok = run.stats().as_dict(), int(np.argmax(run.logits()))
                prof = cProfile.Profile()
                prof.enable()
                t = time.perf_counter()
                for _ in range(nd):
                    run.decode(tok)
                    tok = int(np.argmax(run.logits()))
                decode = time.perf_counter() - t
                prof.disable()
                st = run.stats().as_dict()
            if report:
                keys = ("freeze_seconds", "thaw_seconds", "freeze_events", "thaw_events", "recoveries")
                d = {k: float(st[k]) - float(st0[k]) for k in keys}
                print(f"L={n} prefill {n / prefill:.0f} tok/s, decode {nd / decode:.1f} tok/s, freeze {d['freeze_seconds']:.3f} s "
                      f"({d['freeze_events']:.0f} events), thaw {d['thaw_seconds']:.3f} s ({d['thaw_events']:.0f}), "
                      f"recoveries {d['recoveries']:.0f}")
                stats = pstats.Stats(prof)
                stats.sort_stats("tottime").print_stats(22)
                stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
