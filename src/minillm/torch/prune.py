"""Pruning: remove weights that matter least, unstructured (masks) or structured (a smaller model).

Unstructured (the model keeps its shape; pruned weights are zeros):
- magnitude (Han et al. 2015): zero exactly round(s * n) weights of smallest |w|, per weight
  matrix ("layer" scope) or over all prunable matrices together ("global" scope);
- 2:4 semi-structured (NVIDIA Ampere's sparse tensor cores): in every row, of each 4 consecutive
  input weights the 2 of largest |w| stay.
The prunable weights are the Linear weights of the blocks (attention q, k, v, o and the MLP);
embeddings, norms and lm_head stay dense. A recovery fine-tune keeps the zeros: masks are the
nonzero pattern of the pruned weights (`masks_of`), re-applied after every optimizer step.

Structured (a smaller dense model that really runs faster): whole attention heads or MLP hidden
channels, scored by importance = ||W[:, j]|| * rms(x_j) over the input columns j of attn.o / mlp.down
(the Wanda score, Sun et al. 2023; rms = 1 without calibration batches, i.e. weight norms only).
The same count is kept in every layer (the config has one n_heads and one d_ff), each layer choosing
its own heads / channels. Removing a head's columns of attn.o is exactly what zeroing them does, so
the pruned model's logits equal those of the dense model with those columns masked.
With grouped-query attention (n_kv_heads < n_heads) every K/V head keeps the same number of query
heads, so head sparsity comes in steps of n_kv_heads / n_heads; with MHA a head goes with its K/V.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from minillm.checkpoint import CONFIG_FILE, CheckpointError
from minillm.config import ModelConfig
from minillm.files import read_json

METHODS = ("magnitude", "2:4", "heads", "channels")
SCOPES = ("layer", "global")
LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")
Params = dict[str, np.ndarray]


def prunable_names(config: ModelConfig) -> list[str]:
    """The canonical names of the weight matrices unstructured pruning may zero."""
    kinds = [k for k in LINEARS if k != "mlp.gate" or config.mlp == "swiglu"]
    return [f"blocks.{i}.{k}.weight" for i in range(config.n_layers) for k in kinds]


# --- unstructured: masks (True = kept) ------------------------------------------------------------
def magnitude_masks(params: Params, names: list[str], sparsity: float, scope: str = "layer") -> Params:
    """Masks zeroing exactly round(sparsity * n) weights of smallest |w| in each matrix (scope
    "layer") or among all `names` together (scope "global"); ties broken by position."""
    _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "layer":
        return {n: _smallest_off(np.abs(params[n]).ravel(), sparsity).reshape(params[n].shape) for n in names}
    flat = np.concatenate([np.abs(params[n]).ravel() for n in names])  # (N,) every prunable weight
    keep = _smallest_off(flat, sparsity)
    sizes = np.cumsum([0] + [params[n].size for n in names])
    return {n: keep[sizes[i]:sizes[i + 1]].reshape(params[n].shape) for i, n in enumerate(names)}


def _smallest_off(magnitude: np.ndarray, sparsity: float) -> np.ndarray:
    """(n,) -> (n,) bool, False at the round(sparsity * n) smallest entries."""
    k = int(round(sparsity * magnitude.size))
    keep = np.ones(magnitude.size, dtype=bool)
    keep[np.argsort(magnitude, kind="stable")[:k]] = False
    return keep


def two_four_masks(params: Params, names: list[str]) -> Params:
    """2:4 masks: in each row, the 2 largest |w| of every 4 consecutive input weights stay."""
    masks = {}
    for n in names:
        out, inp = params[n].shape
        if inp % 4:
            raise ValueError(f"2:4 pruning needs in_features divisible by 4; {n} has {inp}")
        groups = np.abs(params[n]).reshape(out, inp // 4, 4)
        top2 = np.argsort(-groups, axis=-1, kind="stable")[..., :2]  # (out, inp/4, 2)
        keep = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(keep, top2, True, axis=-1)
        masks[n] = keep.reshape(out, inp)
    return masks


def apply_masks(params: Params, masks: Params) -> Params:
    """params with masked-off weights set to 0 (a new dict; unmasked tensors shared)."""
    return {n: (p * masks[n]).astype(p.dtype) if n in masks else p for n, p in params.items()}


def record_of(run_dir: str | Path) -> dict | None:
    """The "prune" record of a run's config.json (None for a run that was not pruned)."""
    return read_json(Path(run_dir) / CONFIG_FILE, CheckpointError).get("prune")


def masks_of(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The kept pattern (weight != 0) of a pruned model's `names`: what a recovery step re-applies."""
    state = dict(model.named_parameters())
    return {n: state[n].detach() != 0 for n in names}


@torch.no_grad()
def reapply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (after an optimizer step moved them)."""
    state = dict(model.named_parameters())
    for n, mask in masks.items():
        state[n].mul_(mask.to(state[n].device))


def sparsity_of(params: Params, names: list[str]) -> float:
    """Fraction of zeros among `names`."""
    return sum(int((params[n] == 0).sum()) for n in names) / sum(params[n].size for n in names)


# --- structured: importance, then a smaller config and smaller matrices ---------------------------
@torch.no_grad()
def input_rms(model: torch.nn.Module, batches: Iterable[torch.Tensor],
              kinds=("attn.o", "mlp.down")) -> Params:
    """rms of each input feature of the `kinds` Linears of every block over calibration batches
    (each (B, T) token ids): {"blocks.{i}.attn.o": (H * hd,), "blocks.{i}.mlp.down": (d_ff,)}."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (B*T, in)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    modules = dict(model.named_modules())
    names = [n for n in modules if n.startswith("blocks.") and n.split(".", 2)[-1] in kinds]
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        was_training = model.training
        model.eval()
        for tokens in batches:
            model(tokens)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).sqrt().numpy() for n in names}


def column_importance(params: Params, name: str, rms: Params | None) -> np.ndarray:
    """||W[:, j]|| * rms(x_j) for the input columns j of the Linear `name` (e.g. blocks.0.mlp.down)."""
    norms = np.linalg.norm(params[f"{name}.weight"].astype(np.float64), axis=0)  # (in,)
    return norms * (rms[name] if rms is not None else 1.0)


def keep_heads(config: ModelConfig, params: Params, sparsity: float,
               rms: Params | None = None) -> list[np.ndarray]:
    """Per layer, the sorted query-head indices to keep: in each K/V group the same number
    round(G * (1 - sparsity)) of its G query heads, those of highest importance."""
    _check_sparsity(sparsity)
    H, K, hd = config.n_heads, config.n_kv_heads, config.head_dim
    G = H // K
    kept = int(round(G * (1 - sparsity))) if K < H else int(round(H * (1 - sparsity)))
    if kept < 1 or kept == (G if K < H else H):
        step = f"in steps of 1/{G} ({G} query heads per K/V head)" if K < H else f"in steps of 1/{H}"
        raise ValueError(f"head sparsity {sparsity} keeps {'no' if kept < 1 else 'every'} head: "
                         f"this model prunes heads {step}")
    keep = []
    for i in range(config.n_layers):
        score = column_importance(params, f"blocks.{i}.attn.o", rms).reshape(H, hd).sum(1)  # (H,)
        groups = score.reshape(K, G) if K < H else score.reshape(1, H)  # GQA: choose within groups
        top = np.argsort(-groups, axis=1, kind="stable")[:, :kept]  # (groups, kept)
        keep.append(np.sort((top + np.arange(groups.shape[0])[:, None] * groups.shape[1]).ravel()))
    return keep


def keep_channels(config: ModelConfig, params: Params, sparsity: float,
                  rms: Params | None = None) -> list[np.ndarray]:
    """Per layer, the sorted MLP hidden channels to keep: the round(d_ff * (1 - sparsity)) most important."""
    _check_sparsity(sparsity)
    kept = int(round(config.d_ff * (1 - sparsity)))
    if not 1 <= kept < config.d_ff:
        raise ValueError(f"channel sparsity {sparsity} keeps {kept} of d_ff={config.d_ff} channels")
    return [np.sort(np.argsort(-column_importance(params, f"blocks.{i}.mlp.down", rms), kind="stable")[:kept])
            for i in range(config.n_layers)]


def remove_heads(config: ModelConfig, params: Params, keep: list[np.ndarray]) -> tuple[ModelConfig, Params]:
    """The smaller model without the heads not in `keep`: q rows and o columns of those heads go
    (and their K/V rows under MHA); n_heads shrinks, head_dim stays (now explicit)."""
    H, K, hd = config.n_heads, config.n_kv_heads, config.head_dim
    out = dict(params)
    for i, heads in enumerate(keep):
        rows = (heads[:, None] * hd + np.arange(hd)).ravel()  # (kept * hd,) rows of q / columns of o
        kinds = ("attn.q", "attn.k", "attn.v") if K == H else ("attn.q",)
        for kind in kinds:
            _take(out, f"blocks.{i}.{kind}", rows, axis=0)
        _take(out, f"blocks.{i}.attn.o", rows, axis=1)
    n_heads = len(keep[0])
    smaller = dataclasses.replace(config, n_heads=n_heads, n_kv_heads=n_heads if K == H else K, head_dim=hd)
    return smaller, out


def remove_channels(config: ModelConfig, params: Params,
                    keep: list[np.ndarray]) -> tuple[ModelConfig, Params]:
    """The smaller model without the MLP channels not in `keep`: rows of up (and gate), columns of down."""
    out = dict(params)
    for i, channels in enumerate(keep):
        for kind in ("mlp.up", "mlp.gate") if config.mlp == "swiglu" else ("mlp.up",):
            _take(out, f"blocks.{i}.{kind}", channels, axis=0)
        _take(out, f"blocks.{i}.mlp.down", channels, axis=1)
    return dataclasses.replace(config, d_ff=len(keep[0])), out


def _take(params: Params, name: str, index: np.ndarray, axis: int) -> None:
    params[f"{name}.weight"] = np.ascontiguousarray(np.take(params[f"{name}.weight"], index, axis=axis))
    if axis == 0 and f"{name}.bias" in params:  # an output row's bias goes with it
        params[f"{name}.bias"] = np.ascontiguousarray(params[f"{name}.bias"][index])


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


# --- one entry point: what `minillm prune` calls ----------------------------------------------------
def prune(config: ModelConfig, params: Params, method: str, sparsity: float, scope: str = "layer",
          rms: Params | None = None) -> tuple[ModelConfig, Params, dict]:
    """(config, params) -> (config', params', record). record is what config.json keeps under
    "prune": the method, the sparsity asked and reached, and for masks the pruned tensor names."""
    if method not in METHODS:
        raise ValueError(f"pruning method must be one of {METHODS}, got {method!r}")
    record = {"method": method, "sparsity": sparsity}
    if method in ("magnitude", "2:4"):
        names = prunable_names(config)
        masks = (magnitude_masks(params, names, sparsity, scope) if method == "magnitude"
                 else two_four_masks(params, names))
        params = apply_masks(params, masks)
        record.update(scope=scope if method == "magnitude" else "row", masked=names,
                      reached=sparsity_of(params, names))
        return config, params, record
    if method == "heads":
        smaller, params = remove_heads(config, params, keep_heads(config, params, sparsity, rms))
        record.update(reached=1 - smaller.n_heads / config.n_heads, n_heads=[config.n_heads, smaller.n_heads])
    else:
        smaller, params = remove_channels(config, params, keep_channels(config, params, sparsity, rms))
        record.update(reached=1 - smaller.d_ff / config.d_ff, d_ff=[config.d_ff, smaller.d_ff])
    record["importance"] = "weight norm x activation rms" if rms is not None else "weight norm"
    return smaller, params, record
