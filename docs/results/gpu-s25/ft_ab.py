"""Scratch (not committed): freeze/thaw us a token on a GPU, variants in one process."""
import llama_cpp  # noqa: F401
import cProfile, io, json, pstats, sys
sys.path.insert(0, "benchmarks")
from freeze_thaw import measure
from asrkf_edge import Engine, kvcopy
import asrkf_edge.llama as L
from asrkf_edge.capture import CaptureSpec

model, variants = sys.argv[1], sys.argv[2].split(",")
out = {}
orig_init = L.Context.__init__
with Engine.load(model, n_gpu_layers=-1, flash_attn=True) as eng:
    cap = {"capture": CaptureSpec(tuple(range(eng.model.n_layer)), window=8, probs=False)}
    measure(eng, 1200, 400, 3)  # warm
    for rnd in range(2):
        for v in variants:
            threads = kvcopy.__dict__.get("_THREADS")
            if v == "pageable":
                def init(self, *a, **k):
                    orig_init(self, *a, **k)
                    self._blob = L.Reused(False)
                L.Context.__init__ = init
            if v == "t1":
                kvcopy._THREADS = 1
            for gather in (False, True):
                r = measure(eng, 1200, 400, 10, **(cap if gather else {}))
                bpt = r["store_bytes_per_token"]
                key = f"{v}{'-gather' if gather else ''}"
                out.setdefault(key, []).append((round(r["freeze_us_per_token"], 1), round(bpt / r["freeze_us_per_token"] / 1e3, 2),
                                                round(r["thaw_us_per_token"], 1), round(bpt / r["thaw_us_per_token"] / 1e3, 2)))
            L.Context.__init__ = orig_init
            if threads is not None:
                kvcopy._THREADS = threads
    print(json.dumps({"model": model, "cols": "freeze us/tok, GB/s, thaw us/tok, GB/s", **out}, indent=1))
    if "prof" in sys.argv[3:]:
        for gather in (False, True):
            pr = cProfile.Profile(); pr.enable()
            measure(eng, 1200, 400, 10, **(cap if gather else {}))
            pr.disable()
            s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print("gather" if gather else "state", s.getvalue())
