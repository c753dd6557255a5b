"""How much of a bounded policy's loss comes from reading the prompt in a bounded cache: the same prompt read with
every cell (the KV full would compute), then brought down to the budget by question-time reselection, against
the policy as it runs. Two measures:

    python benchmarks/prefill_fidelity.py kld POLICY[,POLICY...] [--context 2000] [--tokens 128] [--text FILE]
    python benchmarks/prefill_fidelity.py multiturn POLICY --length 4000 [--cases 1,4,5,7,8,9]
    python benchmarks/prefill_fidelity.py split POLICY --length 4000 --cases 5,7 --at 1000,2000,3000 [--budget 0.35]

``kld``: mean KL divergence from full over the forced continuation (bench ppl's loop) both ways, at the active
cells the bounded run peaked at. ``multiturn``: the bench's multi-turn needle cases answered both ways (greedy,
24 tokens). ``split``: which part of the prompt's bounded read loses an answer: for each X in ``--at``, read under
the budget before X and with every cell from X on (everything frozen thawed at X), then the other way round, then cut
by the reselection and answered. The every-cell read is not a policy (its cache holds the whole prompt while reading): it bounds what
any way of reading the prompt within the budget could give (fifteenth session, docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from asrkf_edge import Engine
from asrkf_edge.bench.suites import _log_softmax, _text_tokens, forced_decode, kl_divergence
from asrkf_edge.bench.tasks import needle_multiturn
from asrkf_edge.policies import make_policy
from asrkf_edge.runner import Runner, budget_cells

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # the bench's, two cases each


def read_whole_then_reselect(eng: Engine, policy: str, prompt: list[int], budget: int, chunk: int = 256) -> Runner:
    """A runner that read ``prompt`` with a cell for every token, then chose ``budget`` of them by the question."""
    run = eng.runner(make_policy(policy), len(prompt) + 256)
    for i in range(0, len(prompt), chunk):
        run.prefill(prompt[i : i + chunk], final=i + chunk >= len(prompt))
    cut(run, budget)
    return run


def cut(run: Runner, budget: int) -> None:
    """Bring ``run``'s active set down to ``budget`` cells by the question-time reselection."""
    run.session.budget = budget
    run.policy.reselect(run)
    run._settle()  # the re-read's logits


def answer(eng: Engine, run: Runner, tokens: int = 24) -> str:
    """The greedy reply from where ``run`` stands."""
    out: list[int] = []
    for _ in range(tokens):
        t = int(np.argmax(run.logits()))
        if eng.model.is_eog(t):
            break
        out.append(t)
        run.decode(t)
    return eng.detokenize(out)


def kld(eng: Engine, policies: list[str], context: int, tokens: int, text: str | None) -> None:
    toks = eng.tokenize(Path(text).read_text(), add_bos=False) if text else _text_tokens(eng, context + tokens)
    ctx, tail = toks[:context], toks[context : context + tokens]
    ref = forced_decode(eng, make_policy("full"), None, ctx, tail)
    for name in policies:
        bounded = forced_decode(eng, make_policy(name), 0.35, ctx, tail)
        with read_whole_then_reselect(eng, name, ctx, bounded.stats.active_tokens_peak) as run:
            lps = []
            for tok in tail:
                lps.append(_log_softmax(run.logits()))
                run.decode(tok)
        whole = float(np.mean([kl_divergence(r, lp) for r, lp in zip(ref.logprobs, lps, strict=True)]))
        print(f"{name}: KLD read bounded {bounded.kld(ref):.4f}, read whole then reselected {whole:.4f} "
              f"({bounded.stats.active_tokens_peak} active cells)", flush=True)


def multiturn(eng: Engine, policy: str, length: int, cases: list[int]) -> None:
    for idx in cases:
        c = needle_multiturn(eng, length, DEPTHS[idx // 2], idx)
        bounded = eng.generate(c.prompt, 24, policy=make_policy(policy), budget=0.35, chat=False).text
        prompt = eng.prompt_tokens(c.prompt, chat=False)
        cells = budget_cells(make_policy(policy), 0.35, len(prompt), 24)  # what the bounded run got
        with read_whole_then_reselect(eng, policy, prompt, cells) as run:
            whole = answer(eng, run)
        print(f"case {idx}: read bounded {int(c.correct(bounded))} {bounded!r}; read whole then reselected "
              f"{int(c.correct(whole))} {whole!r}", flush=True)


def split(eng: Engine, policy: str, length: int, cases: list[int], at: list[int], budget: float) -> None:
    for idx in cases:
        c = needle_multiturn(eng, length, DEPTHS[idx // 2], idx)
        prompt = eng.prompt_tokens(c.prompt, chat=False)
        cells = budget_cells(make_policy(policy), budget, len(prompt), 24)
        for x in at:
            for bounded_first in (True, False):
                with eng.runner(make_policy(policy), len(prompt) + 256) as run:
                    whole = run.session.budget
                    run.session.budget = cells if bounded_first else whole
                    run.prefill(prompt[:x], final=False, rest=len(prompt) - x)  # recall's tail: the prompt's end
                    if bounded_first:
                        run.session.budget = whole
                        run.session.thaw(0, x)
                    else:
                        run.session.budget = cells
                    run.prefill(prompt[x:])
                    cut(run, cells)
                    text = answer(eng, run)
                how = f"bounded before {x}, whole after" if bounded_first else f"whole before {x}, bounded after"
                print(f"case {idx} ({len(prompt)} tokens, {cells} cells), {how}: {int(c.correct(text))} {text!r}",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("measure", choices=["kld", "multiturn", "split"])
    ap.add_argument("policies")
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--text", default=None)
    ap.add_argument("--length", type=int, default=4000)
    ap.add_argument("--cases", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--at", default="1000,2000,3000", help="split: where the read changes (tokens)")
    ap.add_argument("--budget", type=float, default=0.35, help="split: the bounded part's budget")
    a = ap.parse_args()
    with Engine.load(flash_attn=True) as eng:
        if a.measure == "kld":
            kld(eng, a.policies.split(","), a.context, a.tokens, a.text)
        elif a.measure == "multiturn":
            multiturn(eng, a.policies, a.length, [int(x) for x in a.cases.split(",")])
        else:
            split(eng, a.policies, a.length, [int(x) for x in a.cases.split(",")], [int(x) for x in a.at.split(",")],
                  a.budget)


if __name__ == "__main__":
    main()
