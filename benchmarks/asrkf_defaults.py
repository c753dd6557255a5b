"""How the ASR-KF-EGR defaults were chosen: sweep one setting at a time on the default model.

Passkey (2k tokens, 3 depths) with no budget, so only the attention threshold decides what is frozen,
and at budget 0.35; and the number of recoveries over 300 generated tokens of a licence text. Prints a
Markdown table per setting. Run: python benchmarks/asrkf_defaults.py  (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from asrkf_edge import AsrKf, Engine, EntropyRule
from asrkf_edge.bench import machine
from asrkf_edge.bench.tasks import passkey

GPL = (Path(__file__).parent.parent / "tests" / "data" / "gpl-3.0.txt").read_text()


def row(engine: Engine, policy: AsrKf) -> str:
    tok = lambda text: engine.tokenize(text, add_bos=engine.model.add_bos)  # noqa: E731
    out = []
    for budget in (None, 0.35):
        right, mean_active = 0, 0.0
        for depth, key in ((0.25, 68231), (0.5, 40917), (0.75, 75302)):
            case = passkey(tok, 2000, depth, key)
            r = engine.generate(case.prompt, 8, policy=policy, budget=budget, chat=False)
            right += case.correct(r.text)
            mean_active += r.stats.kv.active_tokens_mean / r.stats.prompt_tokens / 3
        out += [f"{right}/3", f"{100 * mean_active:.0f}%"]
    gen = engine.generate(GPL[:7000], 300, policy=policy, budget=0.35, chat=False).stats
    out += [str(gen.kv.recoveries), f"{gen.decode_tokens_per_s:.1f}"]
    return " | ".join(out)


def main() -> None:
    base = AsrKf()
    sweeps = {
        "threshold": [0.25, 0.5, 1.0],
        "layers": [(1, 10, 20, 29), None, tuple(range(30))],
        "entropy": [EntropyRule(k=2.0), EntropyRule(k=2.5), EntropyRule(k=3.5)],
        "reeval_every": [4, 16, 64],
    }
    m = machine()
    print(f"SmolLM2-135M-Instruct Q4_1 on {m['cpu']} ({m['cores']} cores); defaults: {base}\n")
    with Engine.load() as engine:
        for field, values in sweeps.items():
            print(f"| {field} | passkey, no budget | mean active | passkey, budget 0.35 | mean active "
                  "| recoveries / 300 tokens | decode tok/s |\n| --- | --- | --- | --- | --- | --- | --- |")
            for v in values:
                label = f"k={v.k}" if isinstance(v, EntropyRule) else ("default (8)" if v is None else str(v))
                print(f"| {label} | {row(engine, dataclasses.replace(base, **{field: v}))} |", flush=True)
            print()


if __name__ == "__main__":
    main()
