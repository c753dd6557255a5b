"""How close the bench's needle answers are: per case that full answers, full's reply is read back with teacher
forcing and the log-probability margin of the answer's first token over the best other token is printed, for full
and any policy variants. A margin of +0.1 nats flips under any change; +3 does not.

    python benchmarks/answer_margins.py LENGTH '[["label","policy",{"budget":0.35,...overrides}]]' [INDICES] [needle|multiturn]

(the fourteenth session: full answers 4 of its 6 multi-turn cases at 4k by 0.11-0.20 nats; docs/RESULTS.md)"""

import json
import sys

import numpy as np

from asrkf_edge import Engine
from asrkf_edge.bench.suites import forced_decode
from asrkf_edge.bench.tasks import needle, needle_multiturn
from asrkf_edge.policies import make_policy

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # the bench's, two cases each


def main() -> None:
    length, variants = int(sys.argv[1]), json.loads(sys.argv[2])
    only = json.loads(sys.argv[3]) if len(sys.argv) > 3 else list(range(10))
    make = needle if len(sys.argv) > 4 and sys.argv[4] == "needle" else needle_multiturn
    with Engine.load(flash_attn=True) as eng:
        cases = []
        for idx in only:
            c = make(eng, length, DEPTHS[idx // 2], idx)
            reply = eng.generate(c.prompt, 24, policy=make_policy("full"), chat=False).text
            answer = eng.tokenize(" " + c.answer, add_bos=False)[0]
            tail = eng.tokenize(reply, add_bos=False)
            if c.correct(reply) and answer in tail:
                cases.append((idx, eng.tokenize(c.prompt, add_bos=False), tail[: tail.index(answer) + 1], answer))
        print("cases full answers:", [c[0] for c in cases], flush=True)
        for label, name, fields in [["full", "full", {"budget": None}], *variants]:
            fields = dict(fields)
            budget = fields.pop("budget", 0.35)
            margins = []
            for _, ctx, tail, answer in cases:
                lp = forced_decode(eng, make_policy(name, **fields), budget, ctx, tail).logprobs[-1]
                margins.append(float(lp[answer] - np.max(np.delete(lp, answer))))
            print(f"{label:14s} wins {sum(m > 0 for m in margins)}  margins", " ".join(f"{m:+.2f}" for m in margins),
                  flush=True)


if __name__ == "__main__":
    main()
