"""The decoder-only Transformer in JAX: pure functions over the canonical params dict.

The twin of minillm/torch/model.py. tokens (B, T) -> token embedding (+ learned or sinusoidal
positions) -> n_layers pre-norm blocks -> final norm -> lm_head -> logits (B, T, vocab).
`params` is exactly what the PyTorch model's state_dict() holds (canonical names of DESIGN.md,
PyTorch shapes), so one model.safetensors serves both frameworks with no conversion; a tied
embedding is stored once, as tok_emb.weight, and also does the lm_head matmul.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minillm import checkpoint
from minillm.config import SINUSOID_SCALE, ModelConfig
from minillm.jax.layers import Params, block, dropout, norm, rope_tables, sinusoidal_table
from minillm.jax.masks import attention_mask
from minillm.jax.moe import mlp_fn


def params_from_canonical(flat: dict, config: ModelConfig) -> Params:
    """Canonical name -> array (numpy, jax or anything array-like) to the dict `forward` takes.
    The layout is the canonical one already; this checks names/shapes and makes float32 jax arrays."""
    checkpoint.check_params(config, flat, "parameters")
    # jnp.array copies: a zero-copy view of a torch tensor would change when torch trains it.
    return {k: jnp.array(np.asarray(v), dtype=jnp.float32) for k, v in flat.items()}


def params_to_canonical(params: Params) -> dict[str, np.ndarray]:
    """The inverse: float32 numpy arrays under canonical names (what minillm.checkpoint writes)."""
    return {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in params.items()}


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """GPT-2 init, as the PyTorch side: N(0, 0.02) everywhere, residual output projections
    N(0, 0.02/sqrt(2L)) so the residual stream's variance does not grow with depth; biases 0,
    norm gains 1."""
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    shapes = checkpoint.canonical_shapes(config)
    params = {}
    for name, k in zip(sorted(shapes), jax.random.split(key, len(shapes))):
        shape = shapes[name]
        if name.endswith("attn.o.weight") or name.endswith("down.weight"):  # also MoE experts' down
            params[name] = residual_std * jax.random.normal(k, shape, jnp.float32)
        elif name.endswith("norm.weight"):
            params[name] = jnp.ones(shape, jnp.float32)
        elif name.endswith(".bias"):
            params[name] = jnp.zeros(shape, jnp.float32)
        else:
            params[name] = 0.02 * jax.random.normal(k, shape, jnp.float32)
    return params


def embed(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, T, D) token embeddings plus additive positions; positions (T,) or (B, T)."""
    x = params["tok_emb.weight"][tokens]  # (B, T, D)
    if config.positions == "learned":
        x = x + params["pos_emb.weight"][positions]
    elif config.positions == "sinusoidal":
        table = SINUSOID_SCALE * sinusoidal_table(config.max_seq_len, config.d_model)  # (max_seq_len, D)
        x = x + table[positions].astype(x.dtype)
    return x


def rope(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """cos, sin for these positions: (T, hd), or (B, 1, T, hd) for per-row positions (B, T)."""
    if config.positions != "rope":
        return None
    cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
    cos, sin = cos[positions], sin[positions]
    if positions.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def lm_head(params: Params, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, vocab); a tied model reuses the token embedding (Press & Wolf 2017)."""
    weight = params.get("lm_head.weight", params["tok_emb.weight"])  # (V, D)
    return x @ weight.T


def forward(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array | None = None,
            mask: jax.Array | None = None, key: jax.Array | None = None,
            router_logits: list | None = None) -> jax.Array:
    """tokens (B, T) -> logits (B, T, vocab).

    positions: (T,) or (B, T) absolute positions, default 0..T-1. mask: (T, S) or (B, 1, T, S)
    bool, True = may attend; None = causal. key: a PRNG key turns dropout on (training only).
    router_logits: a list that collects each mixture-of-experts layer's router logits (N, E).
    """
    T = tokens.shape[1]
    if positions is None:
        if T > config.max_seq_len and config.positions != "alibi":  # ALiBi extrapolates
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {config.max_seq_len}")
        positions = jnp.arange(T)
    keys = jax.random.split(key, config.n_layers + 1) if key is not None else [None] * (config.n_layers + 1)
    x = dropout(embed(params, config, tokens, positions), config.dropout, keys[-1])
    cos_sin, moe_or_dense = rope(config, positions), mlp_fn(config, router_logits)
    mask = attention_mask(config, positions, positions, mask)  # sliding window, ALiBi
    for i in range(config.n_layers):
        x, _ = block(params, f"blocks.{i}", config, x, cos_sin, None, mask, keys[i], moe_or_dense)
    return lm_head(params, norm(params, "norm", config, x))


def forward_cached(params: Params, config: ModelConfig, tokens: jax.Array, cache: dict,
                   start: jax.Array) -> tuple[jax.Array, dict]:
    """The forward of KV-cached decoding: tokens (B, T) sit at positions start .. start + T - 1.

    cache: {"k": (L, B, K, S_max, hd), "v": same} of fixed shape (minillm.jax.kv_cache.make_cache);
    their keys/values are written into it at `start`. Returns (logits (B, T, vocab), new cache).
    """
    positions = start + jnp.arange(tokens.shape[1])  # (T,)
    x = embed(params, config, tokens, positions)
    cos_sin = rope(config, positions)
    mask = attention_mask(config, positions, jnp.arange(cache["k"].shape[3]), None)  # slot p holds position p
    ks, vs = [], []
    for i in range(config.n_layers):
        x, (k, v) = block(params, f"blocks.{i}", config, x, cos_sin, (cache["k"][i], cache["v"][i], start),
                          mask, mlp_fn=mlp_fn(config))
        ks.append(k)
        vs.append(v)
    logits = lm_head(params, norm(params, "norm", config, x))
    return logits, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


def next_token_loss(logits: jax.Array, targets: jax.Array, ignore_index: int = -100) -> jax.Array:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) (tokens shifted by one);
    targets equal to ignore_index (padding, prompt tokens in SFT) do not count."""
    logits = logits.astype(jnp.float32)
    valid = targets != ignore_index  # (B, T)
    safe = jnp.where(valid, targets, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]  # (B, T)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


def num_parameters(params: Params) -> int:
    """Every tensor counted once (a tied embedding is one tensor)."""
    return sum(int(np.prod(v.shape)) for v in params.values())


# --- jit with the config as a compile-time constant ----------------------------------------------
def config_json(config: ModelConfig) -> str:
    """A hashable stand-in for a ModelConfig (dataclasses with eq are not hashable): its JSON."""
    return json.dumps(config.to_dict(), sort_keys=True)


@lru_cache(maxsize=32)
def _jitted_forward(config_json: str):
    config = ModelConfig.from_dict(json.loads(config_json))
    return jax.jit(lambda params, tokens: forward(params, config, tokens))


def jit_forward(config: ModelConfig):
    """`forward` compiled for this config: f(params, tokens) -> logits (one compile per shape)."""
    return _jitted_forward(config_json(config))


# --- run directory <-> params --------------------------------------------------------------------
def save_model(run_dir: str | Path, config: ModelConfig, params: Params,
               extra_config: dict | None = None) -> None:
    """Write config.json and model.safetensors: the same files the PyTorch side writes and reads."""
    checkpoint.save_model(run_dir, config, params_to_canonical(params), extra_config)


def load_params(run_dir: str | Path):
    """run directory -> (config, params, tokenizer or None), ready for `forward` / `generate`."""
    config, tokenizer, flat = checkpoint.load_run(run_dir)
    return config, params_from_canonical(flat, config), tokenizer
