"""The lookup-cost plot: ``store.get`` against the number of stored sessions, per store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.scale import lookup_series

COLOURS = {"memory": "#4c72b0", "sqlite": "#55a868", "postgres": "#c44e52", "redis": "#8172b2"}


def lookup_plot(scale_results: dict[str, Any], path: Path, *, subtitle: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5), dpi=120)
    all_sizes: set[int] = set()
    for label, series in lookup_series(scale_results).items():
        lookups = {int(size): cell for size, cell in series.items()}  # JSON: str keys
        sizes = sorted(lookups)
        if not sizes:
            continue
        all_sizes.update(sizes)
        cells = [lookups[size] for size in sizes]
        colour = COLOURS.get(label.partition(",")[0])
        cached = label in scale_results  # else a store's lookups with its row cache emptied
        axes.plot(
            sizes,
            [c["p50_us"] for c in cells],
            marker="o" if cached else "s",
            linestyle="-" if cached else ":",
            color=colour,
            label=f"{label} p50",
        )
        if not cached:
            continue
        axes.plot(
            sizes,
            [c["p99_us"] for c in cells],
            marker="x",
            linestyle="--",
            color=colour,
            alpha=0.6,
            label=f"{label} p99",
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("sessions stored")
    axes.set_ylabel("store.get of a random stored session (µs)")
    axes.set_title(f"authsessions: lookup cost against stored sessions\n{subtitle}", fontsize=10)
    ticks = sorted(all_sizes)
    axes.set_xticks(ticks, [_short(size) for size in ticks])
    axes.minorticks_off()
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _short(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return str(size)
