"""What a finished run directory says about itself: its final numbers (from its own metrics.jsonl and
config.json), the config values that set runs apart, and a plain-text table of them. Framework-free;
`minillm sweep` and `minillm compare` read runs through it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minillm.checkpoint import CONFIG_FILE, CheckpointError, load_config, parameter_count
from minillm.files import read_json
from minillm.viz.metrics import MetricsLog

# Config values that name where a run lives rather than how it was trained.
NOT_SETTINGS = ("train.out_dir",)


def metric_rows(run: str | Path) -> list[dict]:
    """The rows of run/metrics.jsonl; a clear error for a directory that is not a run or has none."""
    run = Path(run)
    if run.is_file():
        raise ValueError(f"{run} is a file, not a run directory")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    if not (run / CONFIG_FILE).is_file():
        raise ValueError(f"{run} is not a run directory (no {CONFIG_FILE}); give directories made by "
                         f"`minillm train` or `minillm sweep`")
    rows = [r for r in MetricsLog(run / "metrics.jsonl").rows() if isinstance(r, dict) and "step" in r]
    if not any(_loss(r, "train_loss") is not None or _loss(r, "val_loss") is not None for r in rows):
        raise ValueError(f"{run} has no metrics ({run / 'metrics.jsonl'} is missing or holds no loss): "
                         f"was it trained?")
    return rows


def count_parameters(run: str | Path) -> int:
    """Parameters of the run's model, from its config (each canonical tensor once; tied = one table)."""
    return parameter_count(load_config(run))


def summarize(run: str | Path) -> dict[str, Any]:
    """The final numbers of a run: parameters, steps, tokens, training seconds (evaluation excluded),
    the last train and val losses and the best val loss (None where the run logged none)."""
    rows = metric_rows(run)
    train = [r for r in rows if _loss(r, "train_loss") is not None]
    val = [r for r in rows if _loss(r, "val_loss") is not None]
    last = rows[-1]
    try:
        params = count_parameters(run)
    except CheckpointError:
        params = None
    return dict(run=str(run), params=params, steps=last["step"], tokens=last.get("tokens"),
                time=last.get("time"), train_loss=train[-1]["train_loss"] if train else None,
                val_loss=val[-1]["val_loss"] if val else None,
                best_val=min(r["val_loss"] for r in val) if val else None)


def _loss(row: dict, key: str) -> float | None:
    value = row.get(key)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def settings(run: str | Path) -> dict[str, Any]:
    """config.json flattened to {"model.d_model": 128, "train.lr": 0.001, ...} (no data meta)."""
    d = read_json(Path(run) / CONFIG_FILE, CheckpointError)
    flat = {}
    for section in ("model", "train"):
        for key, value in (d.get(section) or {}).items():
            flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return {k: v for k, v in flat.items() if k not in NOT_SETTINGS}


def differing_settings(runs: list[str | Path]) -> list[dict[str, Any]]:
    """For each run, the config values in which the runs differ ({} for a single run)."""
    flats = [settings(run) for run in runs]
    keys = sorted({k for flat in flats for k in flat})
    differ = [k for k in keys if len({json.dumps(flat.get(k)) for flat in flats}) > 1]
    return [{k: flat.get(k) for k in differ} for flat in flats]


def short_key(key: str) -> str:
    """'model.d_model' -> 'd_model', 'train.lr' -> 'lr': what a legend or a label shows."""
    return key.split(".", 1)[1] if key.startswith(("model.", "train.")) else key


def value_text(value: Any) -> str:
    """A config value as written in a name or a legend: 64, 0.001, 1e-05, true, cosine."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def format_value(value: Any) -> str:
    """A table cell: losses to 4 decimals (1.2346), counts with separators (12,345), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value) if isinstance(value, bool) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if 1e-2 <= abs(value) < 1e5 else f"{value:.3g}"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, ...]]) -> str:
    """A left-aligned text table: columns are (key in each row, header[, format spec for numbers])."""
    def cell(value: Any, spec: str | None) -> str:
        return format(value, spec) if spec and isinstance(value, (int, float)) else format_value(value)

    cells = [[c[1] for c in columns]] + [[cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns]
                                         for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
