"""PNG charts of a bench run (matplotlib, the optional ``bench`` extra): quality against active KV for every
policy and budget (the quality/memory frontier), active KV against tokens read, passkey accuracy per length x
depth, decode tokens/s against context length."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import AsrkfError
from .report import order
from .suites import Record


def pyplot():  # -> matplotlib.pyplot, imported lazily (an optional extra)
    try:
        import matplotlib
    except ImportError as e:
        raise AsrkfError("--plots needs matplotlib: pip install 'asrkf-edge[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _policies(records: Sequence[Record]) -> list[str]:
    return sorted({str(r["policy"]) for r in records}, key=order)


def _one_budget(records: Sequence[Record]) -> list[Record]:
    """The records of one budget (0.35 when run, else the smallest), with those of the unbounded policies."""
    budgets = sorted({float(r["budget"]) for r in records if r.get("budget") is not None})
    pick = 0.35 if 0.35 in budgets else (budgets[0] if budgets else None)
    return [r for r in records if r.get("budget") in (None, pick)]


def frontier(records: Sequence[Record], plt, out: Path) -> Path | None:  # matplotlib's pyplot
    """Per task (and mean KLD from the ppl suite), quality against mean active KV bytes as % of the full f16
    cache: one point per policy and budget, a policy's budgets joined by a line."""
    answered = [r for r in records if r["suite"] in ("passkey", "needle") and r["task"] != "cwe"]
    panels = [(t, [r for r in answered if r["task"] == t], "correct", "share answered") for t in ("needle", "multiturn", "passkey")]
    panels.append(("ppl", [r for r in records if r["suite"] == "ppl"], "kld_mean", "mean KLD from full (lower is better)"))
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2 * len(panels), 6.4), 4), squeeze=False)  # title fits
    for ax, (title, rs, key, ylabel) in zip(axes[0], panels, strict=True):
        for pol in _policies(rs):
            pts = {}
            for r in rs:
                if r["policy"] == pol:
                    pts.setdefault(r.get("budget"), []).append(r)
            xy = sorted((sum(float(r["kv_mean_pct"]) for r in v) / len(v), sum(float(r[key]) for r in v) / len(v))
                        for v in pts.values())
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=pol)
        ax.set(xlabel="mean active KV, % of full f16", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Quality against KV memory (every policy and budget)")
    return _save(fig, plt, out / "frontier.png")


def write(records: Sequence[Record], out: Path) -> list[Path]:
    """Write every chart the records allow into ``out``; returns the files written."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if (path := frontier(records, plt, out)) is not None:
        written.append(path)

    traced = _one_budget([r for r in records if r["suite"] == "ppl"])
    if traced:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sorted(traced, key=lambda r: order(r["policy"])):
            xs, ys = zip(*r["trace"], strict=True)
            bpt = int(r["kv_bytes_per_token"]) / 1e6
            ax.plot(xs, [y * bpt for y in ys], label=str(r["policy"]))
        ax.set(xlabel="tokens read", ylabel="active KV (MB)", title="Active KV cache while reading prose")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, plt, out / "active_kv.png"))

    keyed = _one_budget([r for r in records if r["suite"] == "passkey"])
    if keyed:
        pols = _policies(keyed)
        lengths = sorted({int(r["target_length"]) for r in keyed})
        depths = sorted({float(r["depth"]) for r in keyed})
        fig, axes = plt.subplots(1, len(pols), figsize=(2.6 * len(pols), 3.2), squeeze=False)
        for ax, pol in zip(axes[0], pols, strict=True):
            grid = [[0.0] * len(depths) for _ in lengths]
            count = [[0] * len(depths) for _ in lengths]
            for r in keyed:
                if r["policy"] == pol:
                    i, j = lengths.index(int(r["target_length"])), depths.index(float(r["depth"]))
                    grid[i][j] += float(r["score"])
                    count[i][j] += 1
            acc = [[g / c if c else float("nan") for g, c in zip(gr, cr, strict=True)] for gr, cr in zip(grid, count, strict=True)]
            ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_title(pol, fontsize=9)
            ax.set_xlabel("depth", fontsize=8)
        axes[0][0].set_ylabel("prompt tokens", fontsize=8)
        fig.suptitle("Passkey accuracy (green: found)")
        written.append(_save(fig, plt, out / "passkey_heatmap.png"))

    timed = [r for r in records if r["suite"] == "speed"]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for pol in _policies(timed):
            rs = sorted((r for r in timed if r["policy"] == pol), key=lambda r: int(r["length"]))
            ax.plot([int(r["length"]) for r in rs], [float(r["decode_tokens_per_s"]) for r in rs], marker="o", label=pol)
        ax.set(xlabel="context (tokens)", ylabel="decode tokens/s", title="Decode speed against context length", xscale="log")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, plt, out / "decode_speed.png"))
    return written


def _save(fig, plt, path: Path) -> Path:  # matplotlib figure and pyplot
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
