"""Mixtral (transformers' `MixtralForCausalLM`) <-> a LLaMA-style config with a mixture-of-experts MLP
(ModelConfig.n_experts > 1, minillm.torch.moe). minillm.interop.hf calls these for such configs.

Mixtral's layers are LLaMA's (same names and maths) except the MLP: the router is `mlp.gate`
(ours `mlp.router`, both (E, D) without bias), and the experts are two 3-D tensors,
`mlp.experts.gate_up_proj` (E, 2F, D) holding each expert's [gate; up] rows and
`mlp.experts.down_proj` (E, D, F), where ours has one matrix per expert and part:
`mlp.experts.{e}.gate/up.weight` (F, D) and `mlp.experts.{e}.down.weight` (D, F).
"""

from __future__ import annotations

import torch

from minillm.config import ModelConfig


def check(config: ModelConfig) -> None:
    """ValueError naming the field of an MoE config that Mixtral cannot express."""
    wrong = [f"{k}={getattr(config, k)!r}" for k, v in
             (("norm", "rmsnorm"), ("positions", "rope"), ("mlp", "swiglu"), ("bias", False))
             if getattr(config, k) != v]
    if wrong:
        raise ValueError(f"a mixture-of-experts config converts to transformers as Mixtral, which needs "
                         f"rmsnorm, rope, swiglu and no biases; not expressible: {', '.join(wrong)}")


def mixtral_config(config: ModelConfig, llama_fields: dict):
    """The MixtralConfig of this config: the LlamaConfig fields (less the bias switches Mixtral lacks)
    plus the experts'."""
    import transformers

    check(config)
    fields = {k: v for k, v in llama_fields.items() if k not in ("attention_bias", "mlp_bias")}
    return transformers.MixtralConfig(**fields, num_local_experts=config.n_experts,
                                      num_experts_per_tok=config.experts_per_token,
                                      router_aux_loss_coef=config.router_aux_loss_coef,
                                      router_jitter_noise=0.0, sliding_window=config.attention_window)


def moe_fields(hf_config_obj) -> dict:
    """The ModelConfig fields of a Mixtral config's experts ({} for other model types)."""
    c = hf_config_obj
    if c.model_type != "mixtral":
        return {}
    if getattr(c, "router_jitter_noise", 0.0):
        raise ValueError(f"mixtral router_jitter_noise={c.router_jitter_noise} (multiplicative noise on the "
                         f"router's input in training) is not supported")
    return dict(n_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok,
                router_aux_loss_coef=float(c.router_aux_loss_coef))


def is_moe(name: str) -> bool:
    """Whether a canonical name is a router's or an expert's (what experts_to_hf converts)."""
    return ".mlp.router." in name or ".mlp.experts." in name


def experts_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our router and expert tensors of every block -> Mixtral's names and 3-D layout ({} if dense)."""
    out = {}
    for i in range(config.n_layers if config.n_experts > 1 else 0):
        ours, theirs = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
        experts = [f"{ours}experts.{e}." for e in range(config.n_experts)]
        out[theirs + "gate.weight"] = sd[ours + "router.weight"]
        out[theirs + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[p + "gate.weight"], sd[p + "up.weight"]]) for p in experts])  # (E, 2F, D)
        out[theirs + "experts.down_proj"] = torch.stack([sd[p + "down.weight"] for p in experts])  # (E, D, F)
    return out


def experts_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of experts_to_hf: Mixtral's MoE tensors -> our canonical names ({} if dense)."""
    sd = {}
    for i in range(config.n_layers if config.n_experts > 1 else 0):
        ours, theirs = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
        sd[ours + "router.weight"] = hf_sd[theirs + "gate.weight"]
        gate_up, down = hf_sd[theirs + "experts.gate_up_proj"], hf_sd[theirs + "experts.down_proj"]
        for e in range(config.n_experts):
            sd[f"{ours}experts.{e}.gate.weight"], sd[f"{ours}experts.{e}.up.weight"] = gate_up[e].chunk(2)
            sd[f"{ours}experts.{e}.down.weight"] = down[e]
    return sd


def hf_names(config: ModelConfig) -> list[str]:
    """Mixtral's MoE tensor names of this config (what experts_from_hf reads; none if dense)."""
    return [f"model.layers.{i}.mlp.{n}" for i in range(config.n_layers if config.n_experts > 1 else 0)
            for n in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")]
