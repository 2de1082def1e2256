"""Config files and overrides for any config dataclass (this module knows no field of its own):
dict -> dataclass with type checks, TOML files, `--set key=value` overrides. Used by minillm.config.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import tomllib


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a dict; unknown keys are an error that names them."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be built from a table/dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(cls.__name__, k, v, hints[k]) for k, v in d.items()})


def _coerce(owner: str, key: str, value: Any, hint: Any) -> Any:
    """Check a value against a field's type hint; ints are accepted where floats are expected."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is bool and isinstance(value, bool):
            return value
        if t in (int, str) and isinstance(value, t) and not isinstance(value, bool):
            return value
        if dataclasses.is_dataclass(t) and isinstance(value, t):  # e.g. TrainConfig.model
            return value
    names = [getattr(t, "__name__", str(t)) for t in allowed]
    raise ValueError(f"{owner}.{key} must be {' or '.join(names)}, got {value!r}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['model.d_model=256', 'lr=3e-4'] -> {'model.d_model': 256, 'lr': 0.0003}: a value is read as
    TOML, and kept as a string when it is not TOML (so `data_dir=data/x` needs no quotes)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {pair!r} must look like key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
