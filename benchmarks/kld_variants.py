"""Mean KL divergence from `full` of policy variants (any constructor overrides), on the ppl suite's text or another.

Usage: python benchmarks/kld_variants.py '[["follow", "asrkf-follow", 0.35, {}],
                                           ["again 10%", "asrkf-follow", 0.35, {"redecode_mass": 0.1}]]'
       [--context 2000] [--tokens 128] [--text FILE] [--json out.json]

The loop is `asrkf-edge bench ppl`'s (prompt read in 256-token chunks, then each next token forced), with
policies the CLI cannot configure. Per variant: mean KLD, decode tok/s and its ratio to full's in the same
process, recoveries, how many tokens were decoded a second time, thaw and freeze ms per token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from asrkf_edge import Engine
from asrkf_edge.bench.suites import _log_softmax, _text_tokens, kl_divergence
from asrkf_edge.policies import make_policy
from asrkf_edge.runner import budget_cells


def forced(engine: Engine, policy: str, budget: float | None, overrides: dict, ctx: list[int], tail: list[int]) -> dict:
    pol = make_policy(policy, **overrides)
    with engine.runner(pol, budget_cells(pol, budget if pol.bounded else None, len(ctx), len(tail))) as run:
        for i in range(0, len(ctx), 256):
            run.prefill(ctx[i : i + 256], final=i + 256 >= len(ctx))
        logprobs = []
        t0 = time.perf_counter()
        for tok in tail:
            logprobs.append(_log_softmax(run.logits()))
            run.decode(tok)
        seconds = time.perf_counter() - t0
        st = run.stats()
        again = sum(1 for r in getattr(run.policy, "recoveries", []) if r.entropy_after is not None)
    n = len(tail)
    return {"logprobs": logprobs, "tokens_per_s": n / seconds, "recoveries": st.recoveries, "decoded_again": again,
            "thaw_ms_per_token": 1e3 * st.thaw_seconds / n, "freeze_ms_per_token": 1e3 * st.freeze_seconds / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", help='JSON list of [label, policy, budget, {overrides}]')
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--text", default=None, help="a text file instead of the ppl suite's text")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    with Engine.load(flash_attn=True) as eng:
        n = a.context + a.tokens
        toks = eng.tokenize(Path(a.text).read_text(), add_bos=False)[:n] if a.text else _text_tokens(eng, n)
        if len(toks) < n:
            raise SystemExit(f"{a.text} has {len(toks)} tokens, {n} are needed")
        ctx, tail = toks[: a.context], toks[a.context :]
        ref = forced(eng, "full", None, {}, ctx, tail)
        rows = [{"label": "full", "kld": 0.0, **{k: v for k, v in ref.items() if k != "logprobs"}}]
        print(f"full: {ref['tokens_per_s']:.1f} tok/s", flush=True)
        for label, policy, budget, overrides in json.loads(a.variants):
            r = forced(eng, policy, budget, overrides, ctx, tail)
            kld = float(np.mean([kl_divergence(x, y) for x, y in zip(ref["logprobs"], r.pop("logprobs"), strict=True)]))
            rows.append({"label": label, "policy": policy, "budget": budget, "overrides": overrides, "kld": kld, **r})
            ratio = r["tokens_per_s"] / ref["tokens_per_s"]
            print(f"{label:24s} {budget} KLD {kld:.4f}  {r['tokens_per_s']:.1f} tok/s ({ratio:.2f}x full)  "
                  f"recoveries {r['recoveries']}, decoded again {r['decoded_again']}, thaw {r['thaw_ms_per_token']:.1f} "
                  f"freeze {r['freeze_ms_per_token']:.1f} ms/token", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"context": a.context, "tokens": a.tokens, "text": a.text, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
