"""A PNG chart of the speed-ups per case of a benchmark results file."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def speedup_chart(records: list[dict], path: str | os.PathLike) -> None:
    """One row of bars per (case, shape, dtype, mode): each provider's speed-up over that row's reference
    provider (its median time over theirs, log scale). Interpreter times are left out: they are no speed."""
    rows: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r.get("median_ms") and r.get("speedup") and not r.get("interpreted"):
            key = (r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"], r["reference"])
            rows[key][r["provider"]] = r["speedup"]
    rows = {key: speedups for key, speedups in rows.items() if len(speedups) > 1}  # a reference alone says nothing
    if not rows:
        raise ValueError("no timed comparison to chart (interpreted and failed calls are left out)")
    providers = sorted({p for speedups in rows.values() for p in speedups})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    fig, ax = plt.subplots(figsize=(10, 0.3 * sum(len(s) + 1 for s in rows.values()) + 1.5))
    ticks, labels, y = [], [], 0.0
    for (case, shape, dtype, mode, reference), speedups in rows.items():
        ticks.append(y + (len(speedups) - 1) / 2)
        labels.append(f"{case} {shape} {dtype}\n{mode} (vs {reference})")
        for provider, speedup in sorted(speedups.items()):
            ax.barh(y, speedup, 0.8, color=colors[provider], label=provider)
            ax.annotate(f"{speedup:.2f}x", (speedup, y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
            y += 1
        y += 1
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.margins(x=0.15)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up over the reference provider (its time / this time)")
    first = records[0]
    ax.set_title(f"{first.get('device', '')}, commit {first.get('commit', '?')}, {first.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
