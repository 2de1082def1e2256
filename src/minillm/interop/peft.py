"""LoRA adapters in the `peft` library's format, for the `transformers` export of the same model.

peft writes a directory with adapter_config.json (its LoraConfig) and adapter_model.safetensors,
whose tensors are named `base_model.model.{module}.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r], {module} being the layer's path in the transformers model. peft's LoRA is the same maths
as minillm.torch.lora (y = x Wᵀ + b + (lora_alpha / r) B A x), so the tensors carry over unchanged
and only the names change: for the LLaMA family (minillm.interop.hf) blocks.{i}.attn.q becomes
model.layers.{i}.self_attn.q_proj and blocks.{i}.mlp.up becomes model.layers.{i}.mlp.up_proj.

The GPT-2 family is refused: its export fuses q, k and v into one Conv1D `c_attn`, and separate
q/k/v adapters are not one rank-r adapter on c_attn, so no peft LoraConfig describes them.
Only plain LoRA loads (no DoRA, rsLoRA, per-layer ranks, trained biases or extra saved modules).
"""

from __future__ import annotations

import re
from pathlib import Path

from minillm.checkpoint import CheckpointError, load_tensors, save_tensors
from minillm.config import ModelConfig
from minillm.files import atomic_write_json, read_json
from minillm.interop.hf import _llama_name, family
from minillm.torch import lora

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's wrapper (PeftModel.base_model.model is the transformers model)
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "up": "up_proj", "gate": "gate_proj", "down": "down_proj"}
# peft LoraConfig fields whose non-default values change the maths or the tensors: refused on load.
# PLAIN_LORA is also written on save (fields peft has known for long); NEWER ones are only checked.
PLAIN_LORA = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
              "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
NEWER = {"lora_bias": False, "alora_invocation_tokens": None}


def _require_llama(config: ModelConfig) -> None:
    if family(config) == "gpt2":  # family() itself raises for configs neither family represents
        raise ValueError("peft adapters convert for LLaMA-style models only: the GPT-2 export fuses q, k "
                         "and v into one Conv1D c_attn, which per-projection LoRA adapters cannot map to")


def _hf_module(path: str) -> str:
    """Our layer path -> its transformers path: blocks.0.attn.q -> model.layers.0.self_attn.q_proj."""
    return _llama_name(path + ".weight").removesuffix(".weight")


def _peft_name(key: str) -> str:
    """blocks.0.attn.q.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    path, _, suffix = key.partition(".lora_")
    return f"{PREFIX}{_hf_module(path)}.lora_{suffix}"


def save_peft(model, out_dir: str | Path, name: str | None = None,
              base_model_name_or_path: str | None = None) -> None:
    """Write adapter `name` (default: the active one) as peft's adapter_config.json +
    adapter_model.safetensors, loadable with `PeftModel.from_pretrained(to_transformers(base), out_dir)`."""
    _require_llama(model.config)
    config = lora.adapter_config(model, name)
    state = lora.adapter_state_dict(model, name)  # blocks.{i}.attn.q.lora_A.weight ...
    tensors = {_peft_name(k): v.float().cpu().numpy() for k, v in state.items()}
    peft_config = dict(
        PLAIN_LORA, peft_type="LORA", task_type="CAUSAL_LM", r=config.rank, lora_alpha=config.alpha,
        lora_dropout=config.dropout, target_modules=sorted(TARGET_MODULES[t] for t in config.targets),
        init_lora_weights=True, inference_mode=True, base_model_name_or_path=base_model_name_or_path,
    )
    out_dir = Path(out_dir)
    save_tensors(out_dir / WEIGHTS_FILE, tensors, metadata={"format": "pt"})  # as peft writes it
    atomic_write_json(out_dir / CONFIG_FILE, peft_config)


def read_peft_config(path: Path) -> lora.LoRAConfig:
    """peft's adapter_config.json -> LoRAConfig; CheckpointError naming the file and field otherwise."""
    d = read_json(path, CheckpointError)
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    for field, plain in {**PLAIN_LORA, **NEWER}.items():
        if d.get(field, plain) not in (plain, None, [], {}):  # peft writes None / [] / {} for "unused"
            raise CheckpointError(f"{path}: {field}={d[field]!r} is not supported (plain LoRA only)")
    modules = d.get("target_modules")
    if not isinstance(modules, list):  # a string is a regex or "all-linear": a layer set we can't check
        raise CheckpointError(f"{path}: target_modules must be a list of module names, got {modules!r}")
    by_module = {v: k for k, v in TARGET_MODULES.items()}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise CheckpointError(f"{path}: target module {unknown[0]!r} is not one of {sorted(by_module)}")
    targets = tuple(t for t in lora.TARGETS if TARGET_MODULES[t] in modules)
    config = lora.LoRAConfig(d.get("r"), d.get("lora_alpha"), d.get("lora_dropout", 0.0), targets)
    config.validate(str(path), CheckpointError)
    return config


def load_peft(model, adapter_dir: str | Path, name: str = "default") -> lora.LoRAConfig:
    """Load a LoRA adapter saved by peft (for the transformers export of this model's architecture)
    into the model as adapter `name`, and make it the active one."""
    _require_llama(model.config)
    adapter_dir = Path(adapter_dir)
    config = read_peft_config(adapter_dir / CONFIG_FILE)
    source = str(adapter_dir / WEIGHTS_FILE)
    ours = {_hf_module(path): path for path in lora.target_layers(model)}  # their module -> our path
    tensors = {}
    for key, value in load_tensors(source).items():
        module, _, suffix = key.removeprefix(PREFIX).partition(".lora_")
        if not key.startswith(PREFIX) or module not in ours or suffix not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{source}: unexpected tensor {key!r} (not a LoRA A/B weight of a "
                                  "layer of this model: another architecture?)")
        tensors[f"{ours[module]}.lora_{suffix}"] = value
    try:
        lora.load_adapter_state(model, config, tensors, name, source)
    except CheckpointError as e:  # name the tensor as the file does
        message = re.sub(r"'(blocks\.[^']+)'", lambda m: repr(_peft_name(m[1])), str(e))
        raise CheckpointError(message) from None
    return config
