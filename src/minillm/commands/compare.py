"""`minillm compare`: several runs' loss curves on one plot, and their final losses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillm import results
from minillm.viz.compare import X_AXES, draw_curves

COLUMNS = [("label", "run"), ("params", "params"), ("steps", "steps"), ("tokens", "tokens"),
           ("time", "time (s)", ".1f"), ("train_loss", "train loss"), ("val_loss", "val loss"),
           ("best_val", "best val")]
MAX_LEGEND_SETTINGS = 4  # a legend entry names at most this many differing config values


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="plot several runs' loss curves together and print their final losses",
        description="Draw the val (markers) and train (faint) loss curves of run directories on one plot, "
                    "each named by its directory and the config values in which the runs differ, and "
                    "print a table of final losses.",
        epilog="example: minillm compare runs/sweep-a/*/ --out compare.png --x time")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="the figure, e.g. compare.png")
    p.add_argument("--x", choices=tuple(X_AXES), default="tokens", help="the x axis (default: tokens)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    p.set_defaults(func=run)


def labels(runs: list[Path]) -> list[str]:
    """Each run's directory name (its path if names repeat) and the settings that set it apart."""
    names = [run.name or str(run) for run in runs]
    if len(set(names)) < len(names):
        names = [str(run) for run in runs]
    out = []
    for name, differ in zip(names, results.differing_settings(runs)):
        shown = [f"{results.short_key(k)}={results.value_text(v)}" for k, v in differ.items()]
        shown = shown[:MAX_LEGEND_SETTINGS] + (["..."] if len(shown) > MAX_LEGEND_SETTINGS else [])
        settings = ", ".join(s for s in shown if s.split("=")[0] not in name)  # not what the name says
        out.append(f"{name} ({settings})" if settings else name)
    return out


def run(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    rows = [results.summarize(run) for run in runs]  # errors for a non-run or a run without metrics first
    for row, label in zip(rows, labels(runs)):
        row["label"] = label
    draw_curves(runs, [row["label"] for row in rows], args.out, x=args.x)
    if args.json:
        print(json.dumps({"runs": rows, "figure": str(args.out)}))
    else:
        print(results.table(rows, COLUMNS))
        print(f"figure: {args.out}")
    return 0
