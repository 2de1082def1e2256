"""Run directories and checkpoints, framework-neutral (numpy arrays, safetensors, JSON; no pickle).

A run directory holds
  config.json          {"model": ModelConfig fields, "train": TrainConfig fields, ...}
  tokenizer.json       the tokenizer (minillm.tokenizer.load_tokenizer reads it)
  model.safetensors    canonical parameter names -> float32 arrays, PyTorch shapes
  trainer_state.json / trainer_state.safetensors   written by the trainers (optimizer, RNG, data)
  metrics.jsonl, loss.png, best/
Every write is atomic (minillm.files): a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load, save

from minillm.config import ModelConfig, TrainConfig
from minillm.data.loader import read_meta
from minillm.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from minillm.tokenizer import load_tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or does not fit the expected model."""


# --- tensors ---------------------------------------------------------------------------------------
def save_tensors(path: str | Path, tensors: dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for a truncated header/body
        message = f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        raise CheckpointError(message) from None


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter name of this config and its shape (DESIGN.md)."""
    c, D = config, config.d_model
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim  # q == D unless head_dim is explicit
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (c.vocab_size, D), "norm.weight": (D,)}
    if c.positions == "learned":
        shapes["pos_emb.weight"] = (c.max_seq_len, D)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, D)
    norm_bias = c.norm == "layernorm" and c.bias
    if norm_bias:
        shapes["norm.bias"] = (D,)
    linears = {"attn.q": (q, D), "attn.k": (kv, D), "attn.v": (kv, D), "attn.o": (D, q),
               "mlp.up": (c.d_ff, D), "mlp.down": (D, c.d_ff)}
    if c.mlp == "swiglu":
        linears["mlp.gate"] = (c.d_ff, D)
    for i in range(c.n_layers):
        for name, shape in linears.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
            if c.bias:
                shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
        for norm in ("attn_norm", "mlp_norm"):
            shapes[f"blocks.{i}.{norm}.weight"] = (D,)
            if norm_bias:
                shapes[f"blocks.{i}.{norm}.bias"] = (D,)
    if c.n_experts > 1:
        _to_mixture_of_experts(shapes, c)
    if c.encoder_layers:
        _add_encoder_decoder_shapes(shapes, c, linears, norm_bias)
    return shapes


def parameter_count(config: ModelConfig) -> int:
    """Parameters of this config, counted from its canonical shapes (no model is built)."""
    return sum(math.prod(shape) for shape in canonical_shapes(config).values())


def _to_mixture_of_experts(shapes: dict, c: ModelConfig) -> None:
    """Mixture of experts (minillm.torch.moe): each block's MLP becomes a bias-free router,
    blocks.{i}.mlp.router.weight (n_experts, D), and n_experts copies of the MLP, mlp.experts.{e}.*"""
    for name in [n for n in shapes if n.startswith("blocks.") and ".mlp." in n]:
        block, rest = name.split(".mlp.")
        shape = shapes.pop(name)
        shapes.update({f"{block}.mlp.experts.{e}.{rest}": shape for e in range(c.n_experts)})
    shapes.update({f"blocks.{i}.mlp.router.weight": (c.n_experts, c.d_model) for i in range(c.n_layers)})


def _add_encoder_decoder_shapes(shapes: dict, c: ModelConfig, linears: dict, norm_bias: bool) -> None:
    """The encoder-decoder (minillm.torch.seq2seq): encoder.{i} blocks named like the decoder's,
    a final encoder_norm, and in each decoder block a cross-attention (cross_attn.q/k/v/o: queries
    from the decoder, keys/values from the encoder output) after its own norm, cross_attn_norm."""
    layers = {f"encoder.{i}.{name}": shape for i in range(c.encoder_layers)
              for name, shape in linears.items()}
    layers.update({f"blocks.{i}.cross_{name}": shape for i in range(c.n_layers)
                   for name, shape in linears.items() if name.startswith("attn.")})
    norms = ["encoder_norm", *(f"blocks.{i}.cross_attn_norm" for i in range(c.n_layers)),
             *(f"encoder.{i}.{n}" for i in range(c.encoder_layers) for n in ("attn_norm", "mlp_norm"))]
    for name, shape in layers.items():
        shapes[f"{name}.weight"] = shape
        if c.bias:
            shapes[f"{name}.bias"] = (shape[0],)
    for name in norms:
        shapes[f"{name}.weight"] = (c.d_model,)
        if norm_bias:
            shapes[f"{name}.bias"] = (c.d_model,)


def check_params(config: ModelConfig, params: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless params has exactly the names and shapes this config needs."""
    expected = canonical_shapes(config)
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    wrong = [f"{k}: {tuple(params[k].shape)} != {expected[k]}" for k in expected
             if k in params and tuple(params[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{what} {found[:5]}" for what, found in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if found]
        raise CheckpointError(f"{source} does not match the model config (another architecture?): "
                              + "; ".join(parts))


# --- the model part of a run directory -------------------------------------------------------------
def save_model(run_dir: str | Path, config: ModelConfig, params: dict[str, np.ndarray],
               extra_config: dict | None = None) -> None:
    """Write config.json and model.safetensors (float32, canonical names) into run_dir."""
    run_dir = Path(run_dir)
    check_params(config, params, "parameters to save")
    save_tensors(run_dir / MODEL_FILE, {k: np.asarray(v, dtype=np.float32) for k, v in params.items()},
                 metadata={"format": "minillm-1"})
    atomic_write_json(run_dir / CONFIG_FILE, {"model": config.to_dict(), **(extra_config or {})})


def load_config(run_dir: str | Path) -> ModelConfig:
    d = read_json(Path(run_dir) / CONFIG_FILE, CheckpointError)
    try:
        return ModelConfig.from_dict(d["model"] if "model" in d else d)
    except ValueError as e:
        raise CheckpointError(f"{Path(run_dir) / CONFIG_FILE}: {e}") from None


def load_weights(run_dir: str | Path,
                 config: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, params) from run_dir; if `config` is given the weights must fit it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    config = config or load_config(run_dir)
    quantized = "quantization" in read_json(run_dir / CONFIG_FILE, CheckpointError)
    if quantized and not (run_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{run_dir} is a quantized run (integer weights in quantized.safetensors): "
                              f"load it with minillm.torch.sft.load_for_inference")
    params = load_tensors(run_dir / MODEL_FILE)
    check_params(config, params, str(run_dir / MODEL_FILE))
    return config, params


def save_run(run_dir: str | Path, config: ModelConfig, tokenizer, params: dict[str, np.ndarray],
             extra_config: dict | None = None) -> None:
    """A self-contained run directory: config, tokenizer and weights."""
    if tokenizer is not None:
        tokenizer.save(Path(run_dir) / TOKENIZER_FILE)
    save_model(run_dir, config, params, extra_config)


def load_run(run_dir: str | Path):
    """run directory -> (ModelConfig, tokenizer or None, params as numpy arrays)."""
    config, params = load_weights(run_dir)
    tok_path = Path(run_dir) / TOKENIZER_FILE
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    return config, tokenizer, params


# --- trainer state: the resume point, shared by the PyTorch and JAX trainers ---------------------
STATE_FILE = "trainer_state.safetensors"


def write_trainer_state(run_dir: str | Path, tensors: dict[str, np.ndarray], scalars: dict[str, Any],
                        model_file: bool = True) -> None:
    """One atomic file is the unit of resume: trainer_state.safetensors holds the tensors
    (`model.<name>`, `adam.exp_avg.<name>`, `adam.exp_avg_sq.<name>`, `muon.momentum.<name>`,
    `rng.*`) and every scalar as JSON in its header. Then trainer_state.json mirrors the scalars for
    people, and (unless model_file is False: the trainer writes its own) model.safetensors gets the
    latest weights."""
    run_dir = Path(run_dir)
    save_tensors(run_dir / STATE_FILE, tensors, metadata={"scalars": json.dumps(scalars)})
    atomic_write_json(run_dir / "trainer_state.json", scalars)
    if model_file:
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        save_tensors(run_dir / MODEL_FILE, weights, metadata={"format": "minillm-1"})


def read_trainer_state(run_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, scalars) of the resume point; CheckpointError if absent or damaged."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    tensors = load_tensors(path)  # raises CheckpointError on a truncated file
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if "scalars" not in meta:
        raise CheckpointError(f"{path} has no trainer scalars (not a minillm trainer state?)")
    return tensors, json.loads(meta["scalars"])


# --- a training run's data directory, checked the same way by both trainers ----------------------
def check_data_dir(data_dir: str | Path, vocab_size: int) -> dict[str, Any]:
    """meta.json of a prepared data directory; clear errors for a missing file or a model
    vocabulary smaller than the tokenizer's."""
    data_dir = Path(data_dir)
    for name in ("train.bin", "val.bin", "meta.json", TOKENIZER_FILE):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(
                f"{data_dir / name} not found: prepare the data first, e.g. "
                f"`minillm prepare --source shakespeare --tokenizer char --out {data_dir}`")
    meta = read_meta(data_dir)
    if vocab_size < meta["vocab_size"]:
        raise ValueError(f"model.vocab_size ({vocab_size}) is smaller than the data's tokenizer vocabulary "
                         f"({meta['vocab_size']}); remove vocab_size from the config to use the data's")
    return meta


def save_run_files(run_dir: str | Path, cfg: TrainConfig, data_dir: str | Path, meta: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> None:
    """What makes a trainer's run directory self-contained besides weights: a copy of the data's
    tokenizer and config.json ({"model": ..., "train": ..., "data": meta.json, **extra})."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / TOKENIZER_FILE, (Path(data_dir) / TOKENIZER_FILE).read_text(encoding="utf-8"))
    train = {k: v for k, v in cfg.to_dict().items() if k != "model"}
    atomic_write_json(run_dir / CONFIG_FILE, {"model": cfg.model.to_dict(), "train": train, "data": meta,
                                              **(extra or {})})


def check_resume(run_dir: str | Path, data_dir: str | Path, model: ModelConfig) -> None:
    """Refuse to resume a run trained on other data (tokenizer) or with another model config."""
    check_run_tokenizer(run_dir, data_dir)
    saved = load_config(run_dir)
    if saved != model:
        raise CheckpointError(f"{run_dir} was trained with a different model config (another architecture?): "
                              f"saved {saved}, asked for {model}")


def check_run_tokenizer(run_dir: str | Path, data_dir: str | Path) -> None:
    """Refuse a run directory whose tokenizer is not the one the data was made with."""
    existing = Path(run_dir) / TOKENIZER_FILE
    data_tok = read_json(Path(data_dir) / TOKENIZER_FILE, CheckpointError)
    if existing.is_file() and read_json(existing, CheckpointError) != data_tok:
        raise CheckpointError(
            f"{existing} does not match the tokenizer of {data_dir} (the data was tokenized differently); "
            "use another out_dir or the data this run was trained on")
