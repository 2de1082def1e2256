"""The architecture fields of ModelConfig beyond GPT-2 and LLaMA (issue 17), validated here to keep
config.py short: each check raises ValueError naming the field and its value.

- attention: "softmax" (scaled dot-product) or "linear" (Katharopoulos et al. 2020, elu + 1 features).
- attention_window: None (full causal attention) or W: each query sees the last W keys, itself
  included (Mistral's sliding window); softmax attention only.
- positions "alibi" (Press et al. 2022) is one more choice of config.POSITIONS.
- n_experts (0 or 1: the dense MLP), experts_per_token, router_aux_loss_coef: the mixture-of-experts
  MLP (Mixtral; minillm.torch.moe) and the weight of its load-balancing loss.
"""

from __future__ import annotations

from typing import Any

ATTENTIONS = ("softmax", "linear")
# Fields written to config.json only when they differ from these defaults, so every config and
# checkpoint made before the field existed stays byte-identical.
OMITTED_AT_DEFAULT: dict[str, Any] = {"attention": "softmax", "attention_window": None}
OMITTED_AT_DEFAULT.update(n_experts=0, experts_per_token=2, router_aux_loss_coef=0.01)  # MoE
OMITTED_AT_DEFAULT.update(encoder_layers=0, norm_placement="pre")  # the encoder-decoder (seq2seq)


def validate_attention(config: Any) -> None:
    """ValueError naming the field for a bad attention / attention_window."""
    if config.attention not in ATTENTIONS:
        raise ValueError(f"ModelConfig.attention must be one of {ATTENTIONS}, got {config.attention!r}")
    w = config.attention_window
    if w is None:
        return
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise ValueError(f"ModelConfig.attention_window must be None or a positive integer, got {w!r}")
    if config.attention != "softmax":
        raise ValueError(f"ModelConfig.attention_window={w} needs attention='softmax' (a window over "
                         f"linear attention's running sums is not defined), got {config.attention!r}")


def validate_moe(config: Any) -> None:
    """ValueError naming the field for a bad mixture-of-experts setting (minillm.torch.moe)."""
    for name, least in (("n_experts", 0), ("experts_per_token", 1)):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"ModelConfig.{name} must be an integer >= {least}, got {value!r}")
    if config.n_experts > 1 and config.experts_per_token > config.n_experts:
        raise ValueError(f"ModelConfig.experts_per_token ({config.experts_per_token}) must be <= n_experts "
                         f"({config.n_experts})")
    if not config.router_aux_loss_coef >= 0:
        raise ValueError(f"ModelConfig.router_aux_loss_coef must be >= 0, got {config.router_aux_loss_coef}")


def validate_architecture(config: Any) -> None:
    """Every check of this module (ModelConfig.validate calls this one function)."""
    validate_attention(config)
    validate_moe(config)
    validate_seq2seq(config)


def validate_seq2seq(config: Any) -> None:
    """ValueError naming the field for a bad encoder_layers / norm_placement (minillm.torch.seq2seq)."""
    n = config.encoder_layers
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"ModelConfig.encoder_layers must be an integer >= 0, got {n!r}")
    if config.norm_placement not in ("pre", "post"):
        raise ValueError(f"ModelConfig.norm_placement must be 'pre' or 'post', got {config.norm_placement!r}")
    if config.norm_placement == "post" and not n:
        raise ValueError("ModelConfig.norm_placement='post' needs encoder_layers > 0 (the decoder-only "
                         "model is pre-norm)")
    if n and (config.positions not in ("learned", "sinusoidal") or config.attention != "softmax"
              or config.attention_window is not None or config.n_experts > 1):
        raise ValueError(f"ModelConfig.encoder_layers={n} needs positions 'learned' or 'sinusoidal', full "
                         f"softmax attention and a dense MLP, got positions={config.positions!r}, "
                         f"attention={config.attention!r}, attention_window={config.attention_window!r}, "
                         f"n_experts={config.n_experts}")
