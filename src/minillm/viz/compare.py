"""The figures of `minillm sweep` (final val loss against parameters, tokens and time, one marker per
point) and `minillm compare` (several runs' loss curves on one plot). Both read only run directories
(minillm.results); matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from minillm.files import atomic_write_bytes
from minillm.results import short_key, value_text
from minillm.viz.metrics import MetricsLog

X_AXES = {"tokens": "tokens seen", "time": "training time (s, evaluation excluded)", "step": "optimizer step"}
MARKERS = "osD^vP*Xh<>p"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: str | Path) -> None:
    """Write the figure to png atomically (dpi 100, as every figure of the project) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(png, buf.getvalue())


def point_label(values: dict[str, Any]) -> str:
    """{"model.d_model": 64, "lr": 0.001} -> "d_model=64, lr=0.001"."""
    return ", ".join(f"{short_key(k)}={value_text(v)}" for k, v in values.items()) or "default"


def draw_sweep(rows: list[dict[str, Any]], png: str | Path, title: str = "") -> None:
    """Three panels, final val loss against parameters (log scale), tokens seen and training seconds;
    each point of the sweep has its own colour and marker, named in one legend below the panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    panels = (("params", "parameters"), ("tokens", "tokens seen"), ("time", "training time (s)"))
    colours = plt.get_cmap("viridis" if len(rows) > 10 else "tab10")
    for i, row in enumerate(rows):
        style = dict(marker=MARKERS[i % len(MARKERS)], markersize=9, linestyle="none",
                     color=colours(i / max(len(rows) - 1, 1) if len(rows) > 10 else i),
                     label=point_label(row["values"]))
        for ax, (key, _) in zip(axes, panels):
            if row.get(key) is not None and row.get("val_loss") is not None:
                ax.plot(row[key], row["val_loss"], **style)
    for ax, (key, label) in zip(axes, panels):
        _sweep_axis(ax, key, label)
    axes[0].set_ylabel("final val loss (nats/token)")
    fig.suptitle(title or f"sweep: final validation loss of {len(rows)} runs")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 4), frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.06 * ((len(rows) - 1) // 4)))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, png)


def _sweep_axis(ax, key: str, label: str) -> None:
    """Parameters on a log scale (sizes grow by factors), tokens and seconds from 0 (budgets compare
    as lengths); counts in engineering notation (150k, 1.2M) so tick labels stay short."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    if key == "params":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(EngFormatter(sep=""))
    else:
        ax.set_xlim(left=0, right=ax.get_xlim()[1] * 1.08)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    if key != "time":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def draw_curves(runs: list[Path], labels: list[str], png: str | Path, x: str = "tokens") -> None:
    """Every run's val loss (markers) and train loss (thin, faint) against x on one plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab10")
    for i, (run, label) in enumerate(zip(runs, labels)):
        rows = MetricsLog(Path(run) / "metrics.jsonl").rows()
        colour = colours(i % 10)
        train = [(r[x], r["train_loss"]) for r in rows if r.get("train_loss") is not None and x in r]
        val = [(r[x], r["val_loss"]) for r in rows if r.get("val_loss") is not None and x in r]
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=1, alpha=0.45, label="_nolegend_")
        if val:
            ax.plot(*zip(*val), marker=MARKERS[i % len(MARKERS)], color=colour, linewidth=2, label=label)
        elif train:  # no eval rows: the train curve carries the name
            ax.lines[-1].set_label(label)
    ax.plot([], [], color="grey", marker="o", linewidth=2, label="val loss (markers: evaluations)")
    ax.plot([], [], color="grey", linewidth=1, alpha=0.45, label="train loss (faint)")
    ax.set_xlabel(X_AXES[x])
    if x == "tokens":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not a "1e6" offset
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"loss curves of {len(runs)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, png)
