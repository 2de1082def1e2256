"""A small grid of training runs (`minillm sweep`): every list-valued `--set` is an axis, the grid is
their cartesian product, and each point is a full `minillm train` run in out/<point name>.

The plan is built (every point's config made and checked) before anything trains, so a bad value
fails in a second, not after an hour. out/results.json, rewritten atomically after each point, is
the ledger: a point listed there whose run directory still holds the same settings is not trained
again, so a sweep stopped by Ctrl-C continues where it stopped (a point cut short resumes from its
checkpoint). Framework-free: the trainer is imported when a point trains.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from minillm import results
from minillm.config import TrainConfig, load_train_config
from minillm.config_io import parse_overrides
from minillm.files import atomic_write_json, read_json
from minillm.train_loop import train
from minillm.trainers import make_trainer

RESULTS_FILE, FIGURE_FILE = "results.json", "sweep.png"


@dataclass(frozen=True)
class Point:
    name: str  # e.g. "model.d_model=64,lr=0.001": the values that set it apart, also its directory
    values: dict[str, Any]  # axis key -> this point's value
    cfg: TrainConfig


# --- the grid --------------------------------------------------------------------------------------
def parse_axes(pairs: list[str]) -> tuple[dict[str, list], list[str]]:
    """Split --set pairs into the sweep's axes ({key: [values]}, a TOML list each) and the fixed
    overrides every point shares. One-line errors name the key and the value."""
    axes, fixed, seen = {}, [], set()
    for pair in pairs:
        [(key, value)] = parse_overrides([pair]).items()  # "key=value" checked, value read as TOML
        raw = pair.partition("=")[2].strip()
        if key in seen:
            raise ValueError(f"--set {key} is given twice")
        if key in ("out_dir", "train.out_dir"):
            raise ValueError(f"--set {pair}: a sweep puts each point in --out/<point name>, not out_dir")
        seen.add(key)
        if isinstance(value, list):
            if not value:
                raise ValueError(f"--set {key}=[]: an empty list leaves nothing to sweep")
            axes[key] = value
        elif raw.startswith("["):  # meant as a list, but not TOML: parse_overrides kept the raw text
            raise ValueError(f"--set {key}={raw}: not a valid list of values (TOML, e.g. [64, 128] or "
                             f"[1e-3, 3e-3] or [\"cosine\", \"wsd\"])")
        else:
            fixed.append(pair)
    return axes, fixed


def expand(axes: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, in --set order, the last axis varying fastest."""
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def point_name(values: dict[str, Any]) -> str:
    """{"model.d_model": 64, "lr": 0.001} -> "model.d_model=64,lr=0.001" (a directory name)."""
    if not values:
        return "default"
    name = ",".join(f"{k}={results.value_text(v)}" for k, v in values.items())
    return name.replace("/", "_").replace("\\", "_")


def _toml(value: Any) -> str:
    """A value as an override's right-hand side (TOML): strings quoted, floats in full precision."""
    return json.dumps(value) if isinstance(value, (str, bool)) else repr(value)


def plan(config: str | Path, pairs: list[str], out: str | Path) -> list[Point]:
    """Every point of the grid with its checked TrainConfig (config.py's TOML + --set machinery,
    exactly as `minillm train --config config --set ...` would build it, out_dir = out/name)."""
    axes, fixed = parse_axes(pairs)
    points = []
    for values in expand(axes):
        name = point_name(values)
        sets = fixed + [f"{k}={_toml(v)}" for k, v in values.items()]
        sets.append(f"out_dir={json.dumps(str(Path(out) / name))}")
        try:
            cfg = load_train_config(config, sets)
        except ValueError as e:
            raise ValueError(f"point {name}: {e}") from None
        points.append(Point(name, values, cfg))
    if len({p.name for p in points}) < len(points):
        raise ValueError(f"two points of the grid have the same name: {[p.name for p in points]}")
    return points


# --- running it ------------------------------------------------------------------------------------
def point_state(point: Point, ledger: set[str]) -> str:
    """'done' (in the ledger, same settings), 'resume' (a checkpoint of it exists) or 'new'. A run
    directory trained with other settings is an error: it is not overwritten."""
    run = Path(point.cfg.out_dir)
    if not (run / results.CONFIG_FILE).is_file():
        return "new"
    saved = results.settings(run)
    wanted = {f"model.{k}": v for k, v in point.cfg.model.to_dict().items()}
    wanted.update({f"train.{k}": v for k, v in point.cfg.to_dict().items() if k != "model"})
    wanted = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for k, v in wanted.items()}
    keys = (set(saved) | set(wanted)) - set(results.NOT_SETTINGS)
    differ = sorted(k for k in keys if saved.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differ[:3])
        raise ValueError(f"{run} was trained with other settings ({shown}); use another --out or remove it")
    if point.name in ledger:
        return "done"
    return "resume" if (run / "trainer_state.json").is_file() else "new"


def run_sweep(config: str | Path, pairs: list[str], out: str | Path, say: Callable[[str], None] = print,
              quiet: bool | None = True) -> dict[str, Any]:
    """Train every point not finished yet, then the results table. Returns {"points": rows of the
    finished points in grid order, "total": points in the grid, "interrupted": bool}."""
    out = Path(out)
    points = plan(config, pairs, out)
    ledger = {row["name"] for row in _read_ledger(out)}
    states = [point_state(p, ledger) for p in points]  # every check before the first step
    finished = {p.name for p, s in zip(points, states) if s == "done"}
    for i, (point, state) in enumerate(zip(points, states), 1):
        if state == "done":
            say(f"point {i}/{len(points)} {point.name}: finished before, not rerun")
            continue
        say(f"point {i}/{len(points)} {point.name}: {'resuming' if state == 'resume' else 'training'}")
        if state == "new":  # rows of a run killed before its first checkpoint would mix with the new ones
            (out / point.name / "metrics.jsonl").unlink(missing_ok=True)
        summary = train(make_trainer(point.cfg, resume=state == "resume", quiet=quiet))
        if summary.get("interrupted"):
            return _write_results(out, points, finished, config, interrupted=True)
        finished.add(point.name)
        _write_results(out, points, finished, config, interrupted=False)
    return _write_results(out, points, finished, config, interrupted=False)


def _read_ledger(out: Path) -> list[dict]:
    path = out / RESULTS_FILE
    return read_json(path).get("points", []) if path.is_file() else []


def _write_results(out: Path, points: list[Point], finished: set[str], config, interrupted: bool) -> dict:
    """results.json (atomic) of the finished points, each summarized from its own run directory."""
    rows = [dict(name=p.name, values=p.values, **results.summarize(p.cfg.out_dir))
            for p in points if p.name in finished]
    report = dict(config=str(config), axes=list(points[0].values) if points else [], points=rows,
                  total=len(points), interrupted=interrupted)
    atomic_write_json(out / RESULTS_FILE, report)
    return report


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool):
    """Keep stdout for one JSON object: what the trainers print goes to stderr meanwhile."""
    with contextlib.redirect_stdout(sys.stderr) if enabled else contextlib.nullcontext():
        yield
