"""The policy's host time per token with the tracker as it runs on a GPU (background fold, split capture, 4 fold
layers), on the CPU (twenty-sixth session). From a tree's root:

    PYTHONPATH=. python docs/results/gpu-s26/host_time_on_cpu.py MODEL 4096 64

MODEL: ``benchmarks/gpu_make_model.py /tmp/w128.gguf --layers 32 --embd 1024 --heads 8 --kv-heads 8 --ff 1024
--vocab 128256 --ctx 8192`` (the 8B shape's 128 KB of KV a token and its vocabulary). Prints, for two prompts, the
breakdown's figures and each hook's host ms a token. ``SW`` (environment): the interpreter's switch interval."""

# ruff: noqa: E402, I001
import os
import sys

sys.path.insert(0, "benchmarks")
from gpu_breakdown import run_variant
from gpu_mode_on_cpu import gpu_mode

from asrkf_edge import Engine

gpu_mode()
sys.setswitchinterval(float(os.environ.get("SW", "0.005")))
model, n, dec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Engine.load(model, n_gpu_layers=0, flash_attn=True) as eng:
    run_variant(eng, "asrkf", {"fold_layers": 4}, 1024, 4, 0.35, seed=9)  # Numba's compilation stays out
    for seed in range(2):
        r = run_variant(eng, "asrkf", {"fold_layers": 4}, n, dec, 0.35, seed=seed, hooks=True)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "hooks"})
        for k, (v, c) in r["hooks"].items():
            print(f"   {k:34s} {v:7.3f} {c}")
