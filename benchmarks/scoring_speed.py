"""Host attention speed: `attention_mass` (asrkf's scoring of mirrored keys) on random keys of a model's shape.

Usage: python benchmarks/scoring_speed.py [--keys 2800] [--positions 8000] [--rounds 2] [--calls 5] [--parallel]

Shapes: the default model (30 layers, 3 KV heads of 64, 9 query heads) and LLaMA-3-8B (32 layers, 8 KV heads of
128, 32 query heads), 8 of the layers scored as asrkf folds them, 1 query row (``observe``, the follow check)
and 8 rows (the rolling re-evaluation). Prints the best of ``--rounds`` rounds of ``--calls`` calls, in ms per
call, and the minor page faults per call (fresh memory touched by the kernel). To compare two trees, run it with
each on PYTHONPATH in turn (the kernels compile on the first call).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from asrkf_edge.importance import attention_mass

SHAPES = {"default": (30, 3, 64, 9), "llama3-8b": (32, 8, 128, 32)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=2800, help="keys attended (active tokens)")
    ap.add_argument("--positions", type=int, default=8000, help="positions in the mirror")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--parallel", action="store_true", help="Numba's threads (what a GPU run uses)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    for name, (n_layer, n_kv, d, n_head) in SHAPES.items():
        keys = (rng.standard_normal((n_layer, a.positions, n_kv, d)) * 0.5).astype(np.float16).view(np.uint16)
        kpos = np.sort(rng.choice(a.positions, a.keys, replace=False)).astype(np.int64)
        layers = np.round(np.linspace(0, n_layer - 1, 8)).astype(np.int64)
        for rows in (1, 8):
            q = rng.standard_normal((len(layers), rows, n_head, d)).astype(np.float32)
            qpos = np.full(rows, a.positions, np.int64)
            attention_mass(q, qpos, keys, kpos, 1 / np.sqrt(d), a.parallel, layers)  # compile
            best, faults = np.inf, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    attention_mass(q, qpos, keys, kpos, 1 / np.sqrt(d), a.parallel, layers)
                best = min(best, (time.perf_counter() - t0) / a.calls)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (a.rounds * a.calls)
            print(f"{name:10s} {a.keys} keys, {rows} row(s): {1e3 * best:.1f} ms per call, {faults:.0f} page faults",
                  flush=True)


if __name__ == "__main__":
    main()
