"""Each rolling re-evaluation's host attention job on the CPU with the tracker as on a GPU (twenty-seventh session):
its size (active and due tokens), how long the worker took, and whether it was done before its landing. From a
tree's root:

    PYTHONPATH=. python docs/results/gpu-s27/relevance_jobs_on_cpu.py /tmp/w128.gguf 8192 256

MODEL as in docs/results/gpu-s26/host_time_on_cpu.py."""

# ruff: noqa: E402, I001
import sys
import time

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "docs/results/gpu-s26")
from gpu_breakdown import run_variant
from gpu_mode_on_cpu import gpu_mode

from asrkf_edge import Engine
from asrkf_edge.policies import asrkf

gpu_mode()
log: list[dict] = []
relevance_job, judge = asrkf.AsrKf._relevance_job, asrkf.AsrKf._judge


def timed_job(self, ctx, act, frozen):  # noqa: ANN001, ANN201
    rec = {"step": ctx.step, "act": len(act), "due": len(frozen), "queued": time.perf_counter()}
    job = relevance_job(self, ctx, act, frozen)
    job.add_done_callback(lambda _: rec.__setitem__("done", time.perf_counter()))
    log.append(rec)
    return job


def timed_judge(self, ctx) -> None:  # noqa: ANN001
    t0 = time.perf_counter()
    judge(self, ctx)
    if log:
        log[-1].update(landed=ctx.step, land=t0, judge_ms=(time.perf_counter() - t0) * 1e3)


asrkf.AsrKf._relevance_job, asrkf.AsrKf._judge = timed_job, timed_judge
n, dec = int(sys.argv[2]), int(sys.argv[3])
with Engine.load(sys.argv[1], n_gpu_layers=0, flash_attn=True) as eng:
    run_variant(eng, "asrkf", {"fold_layers": 4}, 1024, 4, 0.35, seed=9)  # Numba's compilation stays out
    log.clear()
    r = run_variant(eng, "asrkf", {"fold_layers": 4}, n, dec, 0.35, seed=0)
    print({k: round(v, 3) for k, v in r.items() if isinstance(v, float)})
for rec in log:
    done, land = rec.get("done"), rec.get("land")
    print(rec["step"], rec["act"], rec["due"], "job ms", round((done - rec["queued"]) * 1e3, 1) if done else None,
          "landed", rec.get("landed"), "judge ms", round(rec.get("judge_ms", 0.0), 1),
          "done before landing" if done and land and done < land else "")
