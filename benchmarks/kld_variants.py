"""Mean KL divergence from `full` of policy variants (any constructor overrides), on the ppl suite's text or another.

Usage: python benchmarks/kld_variants.py '[["follow", "asrkf-follow", 0.35, {}],
                                           ["again 10%", "asrkf-follow", 0.35, {"redecode_mass": 0.1}]]'
       [--context 2000] [--tokens 128] [--text FILE] [--json out.json] [--gpu-mode] [--split 32]

The loop is `asrkf-edge bench ppl`'s (prompt read in 256-token chunks, then each next token forced), with
policies the CLI cannot configure. Per variant: mean KLD, decode tok/s and its ratio to full's in the same
process, recoveries, how many tokens were decoded a second time, the runs of cells thaws wrote (llama.cpp: one
copy per run, layer and K/V), thaw and freeze ms per token. ``--gpu-mode``: the policies' trackers run as when
the layers are on a GPU (background fold and re-evaluation, split capture; benchmarks/gpu_mode_on_cpu.py), to see
what that path changes in quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_mode_on_cpu import gpu_mode

from asrkf_edge import Engine
from asrkf_edge.bench.suites import Forced, _text_tokens, forced_decode
from asrkf_edge.policies import make_policy


def figures(f: Forced, n: int) -> dict:
    """A run's speed and recovery figures per continuation token."""
    return {"tokens_per_s": n / f.seconds, "recoveries": f.stats.recoveries, "decoded_again": f.decoded_again,
            "recovered_per_token": sum(int(r["thawed"]) for r in f.stats.recovery_log) / n, "upload_runs": f.stats.upload_runs,
            "thaw_ms_per_token": 1e3 * f.stats.thaw_seconds / n, "freeze_ms_per_token": 1e3 * f.stats.freeze_seconds / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", help='JSON list of [label, policy, budget, {overrides}]')
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--text", default=None, help="a text file instead of the ppl suite's text")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gpu-mode", action="store_true")
    ap.add_argument("--split", type=int, default=0, help="also the mean KLD of the first N continuation tokens and of the rest")
    a = ap.parse_args()
    if a.gpu_mode:
        gpu_mode()
    with Engine.load(flash_attn=True) as eng:
        n = a.context + a.tokens
        toks = eng.tokenize(Path(a.text).read_text(), add_bos=False)[:n] if a.text else _text_tokens(eng, n)
        if len(toks) < n:
            raise SystemExit(f"{a.text} has {len(toks)} tokens, {n} are needed")
        ctx, tail = toks[: a.context], toks[a.context :]
        ref = forced_decode(eng, make_policy("full"), None, ctx, tail)
        full = figures(ref, len(tail))
        rows = [{"label": "full", "kld": 0.0, **full}]
        print(f"full: {full['tokens_per_s']:.1f} tok/s", flush=True)
        for label, policy, budget, overrides in json.loads(a.variants):
            f = forced_decode(eng, make_policy(policy, **overrides), budget, ctx, tail)
            each = f.klds(ref)
            kld, r = float(each.mean()), figures(f, len(tail))
            if a.split:
                r["kld_first"], r["kld_rest"] = float(each[: a.split].mean()), float(each[a.split :].mean())
                print(f"{label:24s} KLD of the first {a.split} tokens {r['kld_first']:.4f}, of the rest {r['kld_rest']:.4f}")
            rows.append({"label": label, "policy": policy, "budget": budget, "overrides": overrides, "kld": kld, **r})
            ratio = r["tokens_per_s"] / full["tokens_per_s"]
            print(f"{label:24s} {budget} KLD {kld:.4f}  {r['tokens_per_s']:.1f} tok/s ({ratio:.2f}x full)  "
                  f"recoveries {r['recoveries']} ({r['recovered_per_token']:.1f} tokens/token), decoded again {r['decoded_again']}, "
                  f"upload runs {r['upload_runs']}, thaw {r['thaw_ms_per_token']:.1f} "
                  f"freeze {r['freeze_ms_per_token']:.1f} ms/token", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"context": a.context, "tokens": a.tokens, "text": a.text,
                                            "gpu_mode": a.gpu_mode, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
