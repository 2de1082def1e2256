"""`minillm sweep`: a small grid of training runs and one figure of what the grid changed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minillm import sweep
from minillm.results import table
from minillm.viz.compare import draw_sweep

COLUMNS = [("name", "point"), ("params", "params"), ("tokens", "tokens"), ("time", "time (s)", ".1f"),
           ("train_loss", "train loss"), ("val_loss", "val loss")]


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train a small grid of configs and plot loss against size, tokens and time",
        description="Train one run per point of a grid: every --set whose value is a list (TOML, quoted for "
                    "the shell) is an axis, a scalar --set applies to every point. Each point is a full "
                    "`minillm train` run in OUT/<point name>. Then OUT/results.json (params, tokens, time, "
                    "final val loss) and OUT/sweep.png (final val loss against parameters, tokens and time). "
                    "Rerunning the same command skips finished points and resumes one cut short by Ctrl-C.",
        epilog="example: minillm sweep --config configs/shakespeare-char-cpu.toml "
               "--set 'model.d_model=[64,128]' --set 'lr=[1e-3,3e-3]' --set max_time=20 --out runs/sweep-a")
    p.add_argument("--config", required=True, help="TOML file, as for `minillm train`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE|KEY=[V1,V2]",
                   help="an axis (--set 'model.d_model=[64,128,256]') or a value for all points "
                        "(--set max_time=20); repeatable")
    p.add_argument("--out", required=True, help="the sweep's directory, e.g. runs/sweep-a")
    p.add_argument("--json", action="store_true", help="one JSON object (results.json) on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars (off anyway when not a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    quiet = True if args.quiet else None
    with sweep.stdout_to_stderr(args.json):  # the trainers' own lines must not break the JSON
        report = sweep.run_sweep(args.config, args.overrides, out, say=say, quiet=quiet)
    if report["points"]:
        draw_sweep(report["points"], out / sweep.FIGURE_FILE, title=f"sweep {out.name}: final val loss")
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report["points"], COLUMNS))
        print(f"{len(report['points'])} of {report['total']} points finished; "
              f"table {out / sweep.RESULTS_FILE}, figure {out / sweep.FIGURE_FILE}")
    if report["interrupted"]:
        print("interrupted: finished points are kept; run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0
