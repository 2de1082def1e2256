"""Configuration as data: one ModelConfig describes every architecture we build (GPT-2 style and
LLaMA style are field values, not subclasses). A config comes from a preset, a TOML file, a run
directory's config.json and `key=value` overrides, parsed by `minillm.config_io`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from minillm.config_arch import OMITTED_AT_DEFAULT, validate_architecture
from minillm.config_io import from_dict, load_toml, parse_overrides
from minillm.data.loader import read_meta

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
# "sinusoidal" adds the table times the embeddings' init std: tokens and positions at one scale, as
# Vaswani et al. §3.4 (at amplitude 1 positions drowned tokens: BENCHMARKS.md, Architectures).
SINUSOID_SCALE = 0.02
MLPS = ("gelu", "gelu_exact", "swiglu")


@dataclass
class ModelConfig:
    """Shape and parts of a decoder-only Transformer.

    mlp: "gelu" is GPT-2's MLP with the tanh approximation of GELU (what GPT-2 was trained with);
    "gelu_exact" the same MLP with the erf form (nanoGPT, BERT; ~3x cheaper on CPU); "swiglu" LLaMA's.
    d_ff defaults to 4*d_model for GELU and to 8/3*d_model rounded up to a multiple of 64 for
    SwiGLU (the LLaMA rule, which keeps the parameter count of a GELU MLP). n_kv_heads defaults
    to n_heads (multi-head attention); fewer gives grouped-query, 1 gives multi-query attention.
    head_dim defaults to d_model // n_heads; an explicit one lets n_heads * head_dim differ from
    d_model (a model whose attention heads were pruned, minillm.torch.prune; Gemma-style shapes).
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
    head_dim: int | None = None
    attention: str = "softmax"
    attention_window: int | None = None  # sliding window (Mistral): each query sees this many keys
    n_experts: int = 0  # mixture-of-experts MLP (Mixtral) when > 1; config_arch.py says the rest
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01
    encoder_layers: int = 0  # > 0: the encoder-decoder of Vaswani et al. 2017 (minillm.torch.seq2seq)
    norm_placement: str = "pre"  # "pre" x + f(norm(x)) | "post" norm(x + f(x)) (encoder-decoder only)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and _divides(self.n_heads, self.d_model):  # else validate() says why
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:  # the defaults of the docstring
            hidden = int(8 * self.d_model / 3)
            self.d_ff = 64 * ((hidden + 63) // 64) if self.mlp == "swiglu" else 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "head_dim"):
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                                 f"n_heads ({self.n_heads}), or head_dim be given")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, choices in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            _check_choice("ModelConfig", name, getattr(self, name), choices)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be divisible by "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.positions='rope' needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        validate_architecture(self)

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
        d = dataclasses.asdict(self)
        if _divides(self.n_heads, self.d_model) and self.head_dim == self.d_model // self.n_heads:
            del d["head_dim"]  # derived, not stored: a dict edited to another d_model / n_heads re-derives it
        # fields at their OMITTED_AT_DEFAULT default are not written: older config.json stays byte-identical
        return {k: v for k, v in d.items() if k not in OMITTED_AT_DEFAULT or v != OMITTED_AT_DEFAULT[k]}


def _divides(n: Any, d: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, d)) and d % n == 0


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (124M): exactly the shape of OpenAI's release, so its weights load unchanged.
    "gpt2-small": dict(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                       norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True),
    # nanoGPT's Shakespeare-char CPU model (README "I only have a macbook"): 0.8M parameters,
    # with nanoGPT's exact (erf) GELU.
    "gpt-char": dict(vocab_size=65, max_seq_len=64, d_model=128, n_layers=4, n_heads=4, d_ff=512,
                     norm="layernorm", positions="learned", mlp="gelu_exact", bias=False,
                     tie_embeddings=True),
    # LLaMA-style parts at ~15M parameters (8k BPE vocabulary, tied embeddings).
    "llama-tiny": dict(vocab_size=8192, max_seq_len=512, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2,
                       d_ff=1024, norm="rmsnorm", norm_eps=1e-5, positions="rope", mlp="swiglu", bias=False,
                       tie_embeddings=True),
    # LLaMA-style at ~40M parameters.
    "llama-40m": dict(vocab_size=8192, max_seq_len=1024, d_model=512, n_layers=12, n_heads=8, n_kv_heads=4,
                      d_ff=1408, norm="rmsnorm", norm_eps=1e-5, positions="rope", mlp="swiglu", bias=False,
                      tie_embeddings=False),
}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data itself. Batches are global: batch_size
    sequences per optimizer step, split into grad_accum micro-steps and across ranks."""

    data_dir: str = "data/shakespeare-char"
    out_dir: str = "runs/shakespeare-char"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    backend: str = "torch"
    # batching
    batch_size: int = 12
    block_size: int = 64
    grad_accum: int = 1
    # budget: the run stops at whichever comes first
    max_steps: int = 2000
    max_tokens: int | None = None
    max_time: float | None = None  # seconds of training (evaluation excluded)
    # AdamW
    lr: float = 1e-3
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    # "muon" (Jordan et al. 2024): Muon for the blocks' 2-D matrices, AdamW for the rest; the schedule
    # scales muon_lr as it scales lr. Defaults of the Muon record. PyTorch backend only.
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    # schedule: linear warmup, then cosine to min_lr | constant | warmup-stable-decay
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent decaying to min_lr
    # evaluation, checkpoints, logs
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int | None = None  # default: every eval
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto = cuda > mps > cpu
    dtype: str = "auto"  # auto = bf16 autocast where supported, fp16 + GradScaler where not, else fp32
    compile: bool = False
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # torchrun / jax.distributed: "ddp" replicates the model on every rank, "fsdp" shards weights,
    # gradients and optimizer state (FSDP2 per block); one process ignores it.
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_batches", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be divisible by "
                             f"grad_accum ({self.grad_accum})")
        if self.block_size > self.model.max_seq_len:
            raise ValueError(f"TrainConfig.block_size ({self.block_size}) exceeds "
                             f"model.max_seq_len ({self.model.max_seq_len})")
        for name, choices in (("schedule", ("cosine", "constant", "wsd")), ("backend", ("torch", "jax")),
                              ("dtype", ("auto", "float32", "bfloat16", "float16")),
                              ("optimizer", ("adamw", "muon")), ("parallel", ("ddp", "fsdp"))):
            _check_choice("TrainConfig", name, getattr(self, name), choices)
        if self.optimizer == "muon":
            self._validate_muon()
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must be between 0 and lr ({self.lr})")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"TrainConfig.decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.eval_interval < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.eval_interval, grad_clip and weight_decay must be >= 0")

    def _validate_muon(self) -> None:
        if self.backend != "torch":
            raise ValueError(f"TrainConfig.optimizer='muon' needs backend='torch' (the {self.backend!r} "
                             f"trainer has AdamW only), got backend={self.backend!r}")
        if not self.lr > 0 or not self.muon_lr > 0:  # Muon's lr is muon_lr times lr_at(step) / lr
            raise ValueError(f"TrainConfig.lr and muon_lr must be > 0 with optimizer='muon', "
                             f"got lr={self.lr}, muon_lr={self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"TrainConfig.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_weight_decay < 0:
            raise ValueError(f"TrainConfig.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_config_from_dict(d: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Top-level TrainConfig keys plus a [model] table (ModelConfig keys, optionally `preset = "name"`
    as the starting point); `model.x=...` overrides reach the table."""
    d = {**d, "model": dict(d.get("model", {}))}
    for key, value in parse_overrides(overrides or []).items():
        if key.startswith("model."):
            d["model"][key[len("model."):]] = value
        else:
            d[key] = value
    preset = d["model"].pop("preset", None)
    d["model"] = ModelConfig.preset(preset, **d["model"]) if preset else ModelConfig.from_dict(d["model"])
    return from_dict(TrainConfig, d)


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float | None = None) -> None:
    """Validate sampling settings (shared by the PyTorch and JAX samplers); None/0 = filter off."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def cache_length(prompt_lengths: Sequence[int], max_new_tokens: int, max_seq_len: int,
                 context_overflow: str = "error") -> int:
    """KV-cache slots a generation needs (longest prompt + new tokens), shared by the PyTorch and
    JAX generators: past max_seq_len a clear error, or with context_overflow="slide" the whole
    context, which then slides over the sequence."""
    if context_overflow not in ("error", "slide"):
        raise ValueError(f"context_overflow must be 'error' or 'slide', got {context_overflow!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if min(prompt_lengths) == 0:
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos id)")
    longest = max(prompt_lengths)
    if longest + max_new_tokens <= max_seq_len:
        return longest + max_new_tokens
    if context_overflow == "error":
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"max_seq_len={max_seq_len}; shorten the prompt, ask for fewer tokens, or use a sliding window "
            f"(context_overflow='slide' / --sliding-window)")
    return max_seq_len


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A training TOML plus `--set` overrides. Unless the [model] table sets vocab_size, it is
    taken from the prepared data (data_dir/meta.json), so a config works for any tokenizer."""
    d = load_toml(path)
    probe = train_config_from_dict(d, overrides)  # validates keys before touching the data
    model = dict(d.get("model", {}))
    explicit = "vocab_size" in model or any(o.startswith("model.vocab_size=") for o in overrides or [])
    if not explicit and (Path(probe.data_dir) / "meta.json").is_file():
        model["vocab_size"] = read_meta(probe.data_dir)["vocab_size"]
        return train_config_from_dict({**d, "model": model}, overrides)
    return probe
