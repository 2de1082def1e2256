"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a module swap.

A frozen linear map W (out, in) learns a low-rank update instead of a full one:
    y = x Wᵀ + b + (alpha / r) · B(A(dropout(x)))      A: (r, in), B: (out, r), r << min(in, out)
A starts Kaiming-uniform (as in the paper's code and `peft`), B at zero: at step 0 the model is the
base model. Only A and B train, which saves their gradients and AdamW state (2 floats per parameter).

`add_lora` swaps the blocks' nn.Linear layers (attn.q/k/v/o, mlp.up/gate/down) for `LoRALinear`,
which keeps the base `weight`/`bias` under their canonical names and holds any number of named
adapters next to them; `set_adapter` picks the one the forward uses. `merge` folds the active
adapter into W (the packed decoder reads W directly) and keeps the original W, so `unmerge`
restores it bit for bit (W + BA - BA is not W in floating point). `strip_lora` goes back to nn.Linear.
On disk: adapter.safetensors (canonical names, `blocks.0.attn.q.lora_A.weight` [r, in], `...lora_B.weight`
[out, r]) + adapter.json (rank, alpha, dropout, targets, format version); interop/peft.py: peft's format.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minillm.checkpoint import CheckpointError, load_tensors, save_tensors
from minillm.files import atomic_write_json, read_json
from minillm.torch.quantize import QuantLinear

TARGETS = ("q", "k", "v", "o", "up", "gate", "down")  # the blocks' linear layers, canonical names
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
FORMAT, VERSION = "minillm-lora", 1


@dataclass(frozen=True)
class LoRAConfig:
    """One adapter's hyperparameters. targets: which of TARGETS it adapts."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank  # the paper's alpha / r: changing r needs no new learning rate

    def validate(self, source: str = "LoRA config", error: type[Exception] = ValueError) -> None:
        """Raise `error` naming `source` and the first bad field."""
        if not self.targets or any(t not in TARGETS for t in self.targets):
            problem = f"targets {list(self.targets)} must be a non-empty list of {', '.join(TARGETS)}"
        elif type(self.rank) is not int or self.rank < 1:
            problem = f"rank must be a positive integer, got {self.rank!r}"
        elif type(self.alpha) not in (int, float) or not self.alpha > 0:
            problem = f"alpha must be a positive number, got {self.alpha!r}"
        elif type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            problem = f"dropout must be in [0, 1), got {self.dropout!r}"
        else:
            return
        raise error(f"{source}: {problem}")


class LoRALinear(nn.Module):
    """A linear layer plus named low-rank adapters. `weight`/`bias` are the base layer's own
    parameters (same objects, same names), so the model's canonical state dict is unchanged."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = None if isinstance(base, nn.Linear) else base  # QLoRA: kept whole, buffers only
        self.weight, self.bias = (base.weight, base.bias) if self.quantized is None else (None, None)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()  # adapter name -> nn.Linear
        self.lora_dropout = nn.ModuleDict()
        self.configs: dict[str, LoRAConfig] = {}
        self.active: str | None = None
        self.register_buffer("unmerged_weight", None, persistent=False)  # W while merged

    @property
    def merged(self) -> bool:
        return self.unmerged_weight is not None

    def add(self, name: str, config: LoRAConfig) -> None:
        ref = self.weight if self.quantized is None else self.quantized.scales  # a float tensor of the base
        kw = dict(bias=False, device=ref.device, dtype=ref.dtype)
        self.lora_A[name] = nn.Linear(self.in_features, config.rank, **kw)  # weight (r, in)
        self.lora_B[name] = nn.Linear(config.rank, self.out_features, **kw)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: the model starts as the base model
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.configs[name] = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)
        name = self.active
        if name is None or name not in self.configs or self.merged:
            return y
        h = self.lora_A[name](self.lora_dropout[name](x)).flatten(0, -2)  # (N, r)
        # y + (alpha / r) · h Bᵀ as one fused multiply-add: the scaling touches (N, r), not (N, out)
        return torch.addmm(y.flatten(0, -2), h, self.lora_B[name].weight.t(), alpha=self.configs[name].scaling
                           ).view(y.shape)

    def merge(self) -> bool:
        """W += (alpha / r) · B A (out, in), keeping W. False if there is nothing to merge."""
        name = self.active
        if self.merged or name not in self.configs or self.quantized is not None:
            return False  # QLoRA: integer weights cannot hold the update, the adapter stays unmerged
        with torch.no_grad():  # in place: bumps the version the packed decoder's cache checks
            self.unmerged_weight = self.weight.detach().clone()
            delta = self.configs[name].scaling * (self.lora_B[name].weight @ self.lora_A[name].weight)
            self.weight.add_(delta.to(self.weight.dtype))
        return True

    def unmerge(self) -> bool:
        if not self.merged:
            return False
        with torch.no_grad():
            self.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None
        return True


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path (e.g. 'blocks.0.attn.q') -> LoRALinear, in model order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_layers(model: nn.Module, targets=TARGETS) -> dict[str, nn.Module]:
    """Module path -> the linear layer (plain or already swapped) of each target in each block."""
    return {path: m for path, m in model.named_modules()  # path: blocks.{i}.{attn|mlp}.{target}
            if isinstance(m, (nn.Linear, LoRALinear, QuantLinear)) and path.rpartition(".")[2] in targets
            and path.split(".")[-2:-1] in (["attn"], ["mlp"])}


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets=TARGETS, name: str = "default") -> int:
    """Add adapter `name` to the target linear layers and make it the active one. Targets absent
    from this architecture (gate without SwiGLU) are skipped. Returns the number of layers adapted."""
    config = LoRAConfig(rank, alpha, dropout, tuple(targets))
    config.validate()
    found = target_layers(model, config.targets)
    if not found:
        raise ValueError(f"no layer of this model matches the LoRA targets {list(config.targets)}")
    if any(name in m.configs for m in lora_layers(model).values()):
        raise ValueError(f"the model already has a LoRA adapter named {name!r}")
    _check_unmerged(model, "add an adapter")
    present = tuple(t for t in TARGETS if any(p.endswith("." + t) for p in found))
    config = LoRAConfig(rank, alpha, dropout, present)  # record what was actually adapted
    for path, module in found.items():
        if not isinstance(module, LoRALinear):  # first adapter here: swap the layer in its parent
            parent, _, leaf = path.rpartition(".")
            module = LoRALinear(module)
            setattr(model.get_submodule(parent), leaf, module)
        module.add(name, config)
    set_adapter(model, name)
    return len(found)


def _check_unmerged(model: nn.Module, action: str) -> None:
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError(f"cannot {action} while an adapter is merged into the weights; unmerge(model) first")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one every LoRA layer applies; None runs the base model."""
    layers = lora_layers(model)
    if name is not None and not any(name in m.configs for m in layers.values()):
        known = sorted({n for m in layers.values() for n in m.configs})
        raise ValueError(f"no LoRA adapter named {name!r} (the model has {known})")
    _check_unmerged(model, "switch adapters")
    for m in layers.values():
        m.active = name


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the forward applies, None for the base model."""
    return next((m.active for m in lora_layers(model).values()), None)


def adapter_config(model: nn.Module, name: str | None = None) -> LoRAConfig:
    """The config of adapter `name` (default: the active one)."""
    name = name if name is not None else active_adapter(model)
    for m in lora_layers(model).values():
        if name in m.configs:
            return m.configs[name]
    raise ValueError(f"the model has no LoRA adapter named {name!r}")


def freeze_base(model: nn.Module) -> int:
    """Train only the active adapter (requires_grad=False elsewhere). Returns the trainable count."""
    name = active_adapter(model)
    adapter_config(model, name)  # raises when there is no active adapter
    for n, p in model.named_parameters():  # adapter parameters are named {path}.lora_A.{name}.weight
        p.requires_grad_(f".lora_A.{name}." in n or f".lora_B.{name}." in n)
    return trainable_summary(model)["trainable"]


def trainable_summary(model: nn.Module, bytes_per_value: int = 4) -> dict[str, int]:
    """Parameter counts and the memory LoRA saves against full fine-tuning of the base: AdamW keeps
    2 values per trainable parameter (exp_avg, exp_avg_sq) and each has a gradient, 1 value."""
    params = list(model.parameters())  # each tensor once (a tied embedding counts once)
    base, trainable = (sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n),
                       sum(p.numel() for p in params if p.requires_grad))
    return dict(trainable=trainable, base=base, total=sum(p.numel() for p in params),
                adamw_bytes_saved=2 * (base - trainable) * bytes_per_value,
                grad_bytes_saved=(base - trainable) * bytes_per_value)


def merge(model: nn.Module) -> int:
    """Fold the active adapter into the base weights, keeping the original W. Returns the layer count."""
    return sum(m.merge() for m in lora_layers(model).values())


def unmerge(model: nn.Module) -> int:
    """Put back the original base weights exactly. Returns the layer count."""
    return sum(m.unmerge() for m in lora_layers(model).values())


def strip_lora(model: nn.Module, merge_active: bool = True) -> int:
    """Replace every LoRALinear by a plain nn.Linear (what the packed decoder and exporters read),
    the active adapter folded in (merge_active) or the base weights; drops all adapters. Returns the count."""
    layers = lora_layers(model)
    for path, m in layers.items():
        m.merge() if merge_active else m.unmerge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same parameters, no copy
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
    return len(layers)


# --- adapters on disk ---------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor: '{path}.lora_A.weight' (r, in) and '{path}.lora_B.weight' (out, r)."""
    name = name if name is not None else active_adapter(model)
    adapter_config(model, name)  # raises for an unknown name
    return {f"{path}.lora_{ab}.weight": getattr(m, f"lora_{ab}")[name].weight.detach()  # ab: A, then B
            for path, m in lora_layers(model).items() if name in m.configs for ab in "AB"}


def load_adapter_state(model: nn.Module, config: LoRAConfig, tensors: dict, name: str = "default",
                       source: str = "adapter") -> None:
    """Add adapter `name` with these A/B values (canonical names), after checking every name and
    shape against the model; nothing changes if a check fails. Errors name `source` and the tensor."""
    config.validate(source, CheckpointError)
    shapes = {k: v for path, m in target_layers(model, config.targets).items()  # what this config makes
              for k, v in ((f"{path}.lora_A.weight", (config.rank, m.in_features)),
                           (f"{path}.lora_B.weight", (m.out_features, config.rank)))}
    unexpected = sorted(k for k in tensors if k not in shapes)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (not a {list(config.targets)} "
                              "adapter of this model: another architecture?)")
    for key, shape in shapes.items():
        if key not in tensors:
            raise CheckpointError(f"{source}: missing tensor {key!r}")
        got = tuple(tensors[key].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {list(got)}, the model needs "
                                  f"{list(shape)} (rank {config.rank}; another architecture?)")
        if not torch.as_tensor(tensors[key]).is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {tensors[key].dtype}, not a float")
    add_lora(model, config.rank, config.alpha, config.dropout, config.targets, name)
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in tensors.items():
            path, _, kind = key.removesuffix(".weight").rpartition(".")  # kind: lora_A | lora_B
            getattr(layers[path], kind)[name].weight.copy_(torch.as_tensor(value))


def save_adapter(model: nn.Module, out_dir: str | Path, name: str | None = None) -> None:
    """Write adapter `name` (default: the active one) as out_dir/adapter.safetensors + adapter.json."""
    out_dir = Path(out_dir)
    config = adapter_config(model, name)
    tensors = {k: v.float().cpu().numpy() for k, v in adapter_state_dict(model, name).items()}
    save_tensors(out_dir / ADAPTER_FILE, tensors)  # tensors first: a config on disk has its weights
    atomic_write_json(out_dir / ADAPTER_CONFIG, dict(format=FORMAT, version=VERSION, **asdict(config)))


def read_adapter_config(path: Path) -> LoRAConfig:
    d = read_json(path, CheckpointError)
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} adapter config "
                              f"(format={d.get('format')!r}, version={d.get('version')!r})")
    missing = [f for f in ("rank", "alpha", "dropout", "targets") if f not in d]
    if missing or not isinstance(d["targets"], list):
        raise CheckpointError(f"{path}: " + (f"missing field {missing[0]!r}" if missing else
                                            f"targets must be a list of names, got {d['targets']!r}"))
    config = LoRAConfig(d["rank"], d["alpha"], d["dropout"], tuple(d["targets"]))
    config.validate(str(path), CheckpointError)
    return config


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default") -> LoRAConfig:
    """Read an adapter directory written by save_adapter into the model as adapter `name` (active)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir / ADAPTER_CONFIG)
    tensors = load_tensors(adapter_dir / ADAPTER_FILE)  # name -> numpy array
    load_adapter_state(model, config, tensors, name, source=str(adapter_dir / ADAPTER_FILE))
    return config
