"""Configuration as data: one ModelConfig describes every architecture we build.

GPT-2 style and LLaMA style are not subclasses, just different field values. Both frameworks,
checkpoints, converters and the CLI read the same config. A config can come from a preset, a
TOML file, a JSON file (a run directory's `config.json`) and `key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
MLPS = ("gelu", "swiglu")


@dataclass
class ModelConfig:
    """Shape and parts of a decoder-only Transformer.

    d_ff defaults to 4*d_model for GELU and to 8/3*d_model rounded up to a multiple of 64 for
    SwiGLU (the LLaMA rule, which keeps the parameter count of a GELU MLP). n_kv_heads defaults
    to n_heads (multi-head attention); fewer gives grouped-query, 1 gives multi-query attention.
    """

    vocab_size: int = 65
    max_seq_len: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu"
    bias: bool = False
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else _swiglu_hidden(self.d_model)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.positions='rope' needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        return cls.from_dict({**MODEL_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {value!r}")


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (124M): exactly the shape of OpenAI's release, so its weights load unchanged.
    "gpt2-small": dict(
        vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
        norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True,
    ),
    # nanoGPT's Shakespeare-char CPU model (README "I only have a macbook"): 0.8M parameters.
    "gpt-char": dict(
        vocab_size=65, max_seq_len=64, d_model=128, n_layers=4, n_heads=4, d_ff=512,
        norm="layernorm", positions="learned", mlp="gelu", bias=False, tie_embeddings=True,
    ),
    # LLaMA-style parts at ~15M parameters (8k BPE vocabulary, tied embeddings).
    "llama-tiny": dict(
        vocab_size=8192, max_seq_len=512, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2,
        d_ff=1024, norm="rmsnorm", norm_eps=1e-5, positions="rope", mlp="swiglu", bias=False,
        tie_embeddings=True,
    ),
    # LLaMA-style at ~40M parameters.
    "llama-40m": dict(
        vocab_size=8192, max_seq_len=1024, d_model=512, n_layers=12, n_heads=8, n_kv_heads=4,
        d_ff=1408, norm="rmsnorm", norm_eps=1e-5, positions="rope", mlp="swiglu", bias=False,
        tie_embeddings=False,
    ),
}


# --- generic dataclass <-> dict / TOML / overrides (shared by every config class) ---------------
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
        if typing.get_origin(t) is list and isinstance(value, list):
            return value
    names = [getattr(t, "__name__", str(t)) for t in allowed]
    raise ValueError(f"{owner}.{key} must be {' or '.join(names)}, got {value!r}")


def parse_value(text: str) -> Any:
    """Parse the right side of a `--set key=value` override as a TOML value, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['model.d_model=256', 'lr=3e-4'] -> {'model.d_model': 256, 'lr': 0.0003}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {pair!r} must look like key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None


def model_config_from_toml(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A TOML file holding ModelConfig keys (optionally `preset = "name"` as the starting point)."""
    d = load_toml(path)
    d.update(parse_overrides(overrides or []))
    preset = d.pop("preset", None)
    return ModelConfig.preset(preset, **d) if preset else ModelConfig.from_dict(d)


def model_config_from_json(path: str | Path) -> ModelConfig:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read model config {path}: {e}") from None
    return ModelConfig.from_dict(d)


__all__ = [
    "ModelConfig", "MODEL_PRESETS", "from_dict", "parse_overrides", "parse_value", "load_toml",
    "model_config_from_toml", "model_config_from_json",
]
