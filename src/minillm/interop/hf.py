"""Conversion between our canonical parameters and Hugging Face `transformers` models.

Two families map exactly:
- GPT-2 (`GPT2LMHeadModel`): LayerNorm, learned positions, tanh-GELU MLP, biases. Its linear
  layers are `Conv1D`, stored [in, out] (the transpose of ours), and Q, K, V are one fused
  `c_attn` of width 3*D, which we split.
- LLaMA (`LlamaForCausalLM`): RMSNorm, RoPE (rotate-half, the same layout as ours, so no
  permutation), SwiGLU, grouped-query attention. Names map one to one. Mistral (its sliding_window
  is ModelConfig.attention_window, and a config with one exports as Mistral) and Qwen2 import as
  the same family: Qwen2 has biases on q/k/v only, so it becomes bias=True with zero o/MLP biases
  (ModelConfig has one `bias` switch), which computes the same.
Biases that one side has and the other lacks are zeros, so a bias-free GPT-2 style run exports
too, and a GPT-2 style run with grouped-query attention exports with each K/V head repeated.
minillm.interop.hf_dir reads and writes whole directories (run dir <-> HF dir).
Requires the `hf` extra (transformers).
"""

from __future__ import annotations

import torch

from minillm.config import ModelConfig
from minillm.interop import hf_mixtral
from minillm.torch.model import Transformer

_GPT2_PARTS = dict(norm="layernorm", positions="learned", mlp=("gelu", "gelu_exact"), attention="softmax",
                   attention_window=(None,), n_experts=(0, 1))  # mixture of experts: Mixtral, LLaMA-style
_LLAMA_PARTS = dict(norm="rmsnorm", positions="rope", mlp=("swiglu",), attention="softmax")


def family(config: ModelConfig) -> str:
    """'gpt2' or 'llama' if the config is exactly representable by that HF class, else ValueError
    naming the field that no transformers class expresses. A GPT-2 style config without biases
    exports with zero biases (GPT-2 always has them), and with grouped-query attention with each
    K/V head repeated for its query heads: both compute the same function."""
    misses = {}
    for name, parts in (("gpt2", _GPT2_PARTS), ("llama", _LLAMA_PARTS)):
        misses[name] = [f"{k}={getattr(config, k)!r}" for k, v in parts.items()
                        if getattr(config, k) not in (v if isinstance(v, tuple) else (v,))]
    if not misses["llama"]:
        return "llama"
    if not misses["gpt2"]:
        return "gpt2"
    nearest = min(misses, key=lambda name: len(misses[name]))
    raise ValueError(
        "only GPT-2 style (layernorm, learned positions, gelu) and LLaMA style "
        f"(rmsnorm, rope, swiglu) configs convert to transformers; not expressible: "
        f"{', '.join(misses[nearest])} (nearest: {'GPT-2' if nearest == 'gpt2' else 'LLaMA'} style)"
    )


def hf_config(config: ModelConfig):
    """The transformers config object describing the same shape."""
    import transformers

    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings)
    if family(config) == "gpt2":
        if config.n_heads * config.head_dim != config.d_model:  # GPT-2 derives head_dim from n_embd
            raise ValueError(f"GPT-2 style config with head_dim={config.head_dim} (n_heads * head_dim != "
                             f"d_model={config.d_model}, a head-pruned model) has no transformers GPT2Config")
        return transformers.GPT2Config(
            n_positions=config.max_seq_len, n_embd=config.d_model, n_layer=config.n_layers,
            n_head=config.n_heads, n_inner=config.d_ff,
            activation_function="gelu_new" if config.mlp == "gelu" else "gelu",  # tanh form / erf form
            layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
            attn_pdrop=config.dropout, **common,
            # GPT-2's <|endoftext|> is id 50256; a smaller vocabulary has no such token.
            **({} if config.vocab_size > 50256 else dict(bos_token_id=None, eos_token_id=None)),
        )
    llama = dict(
        hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, hidden_act="silu",
        attention_dropout=config.dropout, head_dim=config.head_dim, **common,
    )
    if config.n_experts > 1:  # Mixtral: LLaMA's layers with a mixture-of-experts MLP (hf_mixtral.py)
        return hf_mixtral.mixtral_config(config, llama)
    if config.attention_window is not None:  # Mistral: LLaMA's layers under a sliding window, no biases
        if config.bias:
            raise ValueError("attention_window with bias=True has no transformers class (Mistral: no biases)")
        return transformers.MistralConfig(sliding_window=config.attention_window, **llama)
    return transformers.LlamaConfig(attention_bias=config.bias, mlp_bias=config.bias, **llama)


def _gpt2_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    sd = _with_zero_biases(sd, config)
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(config.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for p in ("weight", "bias"):
            q, k, v = (sd[b + f"attn.{n}.{p}"] for n in "qkv")
            fused = torch.cat([q, _per_query_head(k, config), _per_query_head(v, config)])  # (3D, ...)
            out[h + f"attn.c_attn.{p}"] = fused.T if p == "weight" else fused  # Conv1D stores [in, out]
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"].T  # Conv1D stores [in, out]
            out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
            out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    out["lm_head.weight"] = sd.get("lm_head.weight", sd["tok_emb.weight"])
    return out


def _gpt2_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"tok_emb.weight": hf["transformer.wte.weight"], "pos_emb.weight": hf["transformer.wpe.weight"]}
    D = config.d_model
    for i in range(config.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        w, bias = hf[h + "attn.c_attn.weight"].T, hf[h + "attn.c_attn.bias"]  # (3D, D), (3D,)
        for j, n in enumerate("qkv"):
            sd[b + f"attn.{n}.weight"] = w[j * D:(j + 1) * D]
            sd[b + f"attn.{n}.bias"] = bias[j * D:(j + 1) * D]
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            sd[b + ours + ".weight"] = hf[h + theirs + ".weight"].T  # Conv1D stores [in, out]
            sd[b + ours + ".bias"] = hf[h + theirs + ".bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            sd[b + ours + ".weight"] = hf[h + theirs + ".weight"]
            sd[b + ours + ".bias"] = hf[h + theirs + ".bias"]
    sd["norm.weight"], sd["norm.bias"] = hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"]
    if not config.tie_embeddings:
        sd["lm_head.weight"] = hf["lm_head.weight"]
    return sd


def _per_query_head(kv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """K or V rows (n_kv_heads * head_dim, ...) -> (n_heads * head_dim, ...): each K/V head repeated
    for the n_heads / n_kv_heads query heads that share it (as the attention's repeat_interleave)."""
    rest = kv.shape[1:]
    heads = kv.reshape(config.n_kv_heads, config.head_dim, *rest)
    return heads.repeat_interleave(config.n_heads // config.n_kv_heads, 0).reshape(config.d_model, *rest)


def _with_zero_biases(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A bias-free GPT-2 style state dict plus the zero biases GPT2LMHeadModel always has."""
    if config.bias:
        return sd
    sd = dict(sd)
    for name in [k for k in sd if k.startswith("blocks.") or k == "norm.weight"]:
        sd.setdefault(name.removesuffix(".weight") + ".bias", torch.zeros(sd[name].shape[0]))
    return sd


# canonical suffix within a block <-> LLaMA suffix within a decoder layer (one to one)
_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{n}.{p}": f"self_attn.{n}_proj.{p}" for n in "qkvo" for p in ("weight", "bias")},
    **{f"mlp.{n}.{p}": f"mlp.{n}_proj.{p}" for n in ("gate", "up", "down") for p in ("weight", "bias")},
}
_LLAMA_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}


def _llama_name(name: str) -> str:
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    _, i, rest = name.split(".", 2)  # blocks.{i}.{rest}
    return f"model.layers.{i}.{_LLAMA_BLOCK[rest]}"


def to_transformers(model_or_state, config: ModelConfig | None = None):
    """Our Transformer (or a canonical state dict plus its config) -> an HF model with the same weights."""
    import transformers

    config = config or model_or_state.config
    sd = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    kind = family(config)
    if kind == "gpt2":
        hf_sd, cls = _gpt2_to_hf(sd, config), transformers.GPT2LMHeadModel
    else:
        hf_sd = {_llama_name(k): v for k, v in sd.items() if not hf_mixtral.is_moe(k)}
        hf_sd.update(hf_mixtral.experts_to_hf(sd, config))  # Mixtral's routers and experts, if any
        cls = transformers.MistralForCausalLM if config.attention_window else transformers.LlamaForCausalLM
        cls = transformers.MixtralForCausalLM if config.n_experts > 1 else cls
        if config.tie_embeddings:
            hf_sd["lm_head.weight"] = sd["tok_emb.weight"]
    hf_model = cls(hf_config(config)).eval()
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    missing, unexpected = hf_model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"conversion to {cls.__name__} left missing={missing} unexpected={unexpected}")
    return hf_model


# GPT2Config.activation_function -> our mlp: "gelu_new" / "gelu_pytorch_tanh" are the tanh form
_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral")  # LLaMA's names and maths (+ window, + experts)


def config_from_hf(hf_config_obj) -> ModelConfig:
    """transformers GPT2Config / LlamaConfig / MistralConfig / Qwen2Config -> ModelConfig; ValueError
    naming the field for what ModelConfig cannot express."""
    c = hf_config_obj
    if c.model_type == "gpt2":
        if c.activation_function not in _GPT2_ACTIVATIONS:
            raise ValueError(f"GPT-2 activation {c.activation_function!r} is not supported")
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or not getattr(c, "scale_attn_weights", True):
            raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx=true / scale_attn_weights=false "
                             "is not supported")
        return ModelConfig(
            vocab_size=c.vocab_size, max_seq_len=c.n_positions, d_model=c.n_embd, n_layers=c.n_layer,
            n_heads=c.n_head, d_ff=c.n_inner or 4 * c.n_embd, norm="layernorm", norm_eps=c.layer_norm_epsilon,
            positions="learned", mlp=_GPT2_ACTIVATIONS[c.activation_function], bias=True,
            tie_embeddings=bool(c.tie_word_embeddings),
        )
    if c.model_type in LLAMA_LIKE:
        window = _check_llama_like(c)
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0)
        # Qwen2 has q/k/v biases only; LLaMA attention_bias (q/k/v/o) and mlp_bias. Any bias makes
        # ours bias=True, and from_transformers fills the biases the checkpoint lacks with zeros.
        bias = c.model_type == "qwen2" or any(getattr(c, k, False) for k in ("attention_bias", "mlp_bias"))
        return ModelConfig(
            vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, d_model=c.hidden_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
            d_ff=c.intermediate_size, norm="rmsnorm", norm_eps=c.rms_norm_eps, positions="rope",
            rope_theta=float(theta), mlp="swiglu", bias=bias, tie_embeddings=bool(c.tie_word_embeddings),
            attention_window=window, **hf_mixtral.moe_fields(c),
        )
    raise ValueError(f"unsupported transformers model_type {c.model_type!r} "
                     f"(gpt2, {', '.join(LLAMA_LIKE)} convert)")


def _check_llama_like(c) -> int | None:
    """ValueError naming the first field of a LLaMA-like config that ModelConfig cannot express;
    returns Mistral's sliding window when it is shorter than the context (else None)."""
    kind = c.model_type
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{kind} rope_type {rope.get('rope_type', rope.get('type'))!r} (rope scaling) "
                         "is not supported")
    if c.hidden_act != "silu":
        raise ValueError(f"{kind} hidden_act {c.hidden_act!r} is not supported (SwiGLU uses silu)")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError(f"{kind} head_dim={head_dim} != hidden_size / num_attention_heads "
                         f"({c.hidden_size // c.num_attention_heads}) is not supported")
    window = getattr(c, "sliding_window", None)
    sliding = any(t != "full_attention" for t in getattr(c, "layer_types", None) or [])
    if kind == "qwen2" and not getattr(c, "use_sliding_window", False):
        window = None  # Qwen2 keeps a sliding_window value it does not use
    if kind == "mistral":  # MistralForCausalLM applies sliding_window to every layer, as attention_window
        return window if window is not None and window < c.max_position_embeddings else None
    if (window is not None and window < c.max_position_embeddings) or (sliding and window is not None):
        raise ValueError(f"{kind} sliding_window={window} < max_position_embeddings="
                         f"{c.max_position_embeddings}: sliding windows import from mistral only")
    return None


def from_transformers(hf_model) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF GPT2LMHeadModel / LlamaForCausalLM (Mistral-, Qwen2ForCausalLM) -> (ModelConfig, canonical
    state dict)."""
    config = config_from_hf(hf_model.config)
    hf_sd = hf_model.state_dict()
    if config.positions == "learned":
        sd = _gpt2_from_hf(hf_sd, config)
    else:
        names = {name: _llama_name(name) for name in _canonical_llama_names(config)}
        used = set(names.values()) | set(hf_mixtral.hf_names(config))
        used |= {"lm_head.weight"} if config.tie_embeddings else set()
        unused = sorted(set(hf_sd) - used)
        if unused:  # a tensor we would silently drop: the model would compute something else
            raise ValueError(f"{type(hf_model).__name__} has tensors minillm does not use: {unused[:3]}")
        sd = {name: hf_sd[theirs] if theirs in hf_sd else torch.zeros(hf_sd[_weight_of(theirs)].shape[0])
              for name, theirs in names.items()} | hf_mixtral.experts_from_hf(hf_sd, config)
    return config, {k: v.detach().float().clone() for k, v in sd.items()}


def _weight_of(bias_name: str) -> str:
    """A missing bias (Qwen2's o_proj / MLP) -> its weight, whose rows give the zero bias's length."""
    if not bias_name.endswith(".bias"):
        raise ValueError(f"checkpoint lacks {bias_name}")
    return bias_name.removesuffix(".bias") + ".weight"


def _canonical_llama_names(config: ModelConfig) -> list[str]:
    names = ["tok_emb.weight", "norm.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for i in range(config.n_layers):
        names += [f"blocks.{i}.{k}" for k in _LLAMA_BLOCK if (config.bias or not k.endswith(".bias"))
                  and (config.n_experts <= 1 or not k.startswith("mlp."))]  # Mixtral: hf_mixtral.py
    return names


def load_pretrained(path: str):
    """Load a local HF checkpoint directory (config.json + safetensors) into our Transformer.

    Only safetensors weights are read (no pickle): transformers is asked for `use_safetensors=True`.
    """
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    config, sd = from_transformers(hf_model)
    model = Transformer(config)
    model.load_state_dict(sd)
    return model
