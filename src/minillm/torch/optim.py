"""The PyTorch trainer's optimizer: AdamW (which parameters decay), or with optimizer = "muon",
Muon for the hidden matrices and AdamW for the rest. The learning rate (minillm.schedule.lr_at)
and clipping are applied by Trainer.train_step.
"""

from __future__ import annotations

from typing import Callable

import torch

from minillm.config import TrainConfig
from minillm.torch.muon import Muon, MuonWithAdamW


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names (with weight decay, without): matrices (Q, K, V, O, MLP, an untied head) decay;
    embeddings, norm gains and biases do not. A tied embedding is one name (tok_emb.weight).
    Frozen parameters (requires_grad False, e.g. the base under LoRA) are in neither list."""
    mask = {name: p.dim() >= 2 and name not in ("tok_emb.weight", "pos_emb.weight")
            for name, p in model.named_parameters() if p.requires_grad}
    return [n for n, d in mask.items() if d], [n for n, d in mask.items() if not d]


def muon_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names (for Muon, for AdamW): Muon takes the 2-D matrices inside the blocks
    (attention q, k, v, o; MLP up, gate, down; LoRA's A and B when those are what trains); the
    embeddings, an untied head, norm gains and biases go to AdamW, as in the reference. Frozen
    parameters are in neither list."""
    mask = {name: p.dim() == 2 and name.startswith("blocks.")
            for name, p in model.named_parameters() if p.requires_grad}
    return [n for n, m in mask.items() if m], [n for n, m in mask.items() if not m]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr_scale: Callable[[str], float] | None = None
                   ) -> tuple[torch.optim.AdamW | MuonWithAdamW, list[str]]:
    """cfg.optimizer's optimizer over the model's trainable parameters; lr_scale(name) multiplies a
    parameter's scheduled learning rate (1 by default; LoRA+ raises B's). Every group carries the
    "lr_scale" that Trainer.train_step multiplies the scheduled lr by. Returns (optimizer, names in
    optimizer order) so checkpoints store the optimizer's state by name."""
    scale = lr_scale or (lambda name: 1.0)
    if cfg.optimizer == "adamw":
        return _adamw(cfg, model, decay_split(model), scale)
    muon_names, adam_names = muon_split(model)
    decay, no_decay = decay_split(model)
    adam_decay = [n for n in decay if n in adam_names]  # an untied head
    adamw = _adamw(cfg, model, (adam_decay, no_decay), scale) if adam_names else None
    muon = _muon(cfg, model, muon_names, scale) if muon_names else None
    parts = [part for part in (adamw, muon) if part is not None]
    return MuonWithAdamW(*(opt for opt, _ in parts)), [n for _, names in parts for n in names]


def _adamw(cfg: TrainConfig, model: torch.nn.Module, split: tuple[list[str], list[str]],
           lr_scale: Callable[[str], float]) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW (Loshchilov & Hutter 2019) over split = (names with weight decay, names without):
    one group per (decay, scale) pair."""
    params, by_group = dict(model.named_parameters()), {}
    for names, wd in zip(split, (cfg.weight_decay, 0.0)):
        for n in names:
            by_group.setdefault((wd, lr_scale(n)), []).append(n)
    groups = [{"params": [params[n] for n in names], "weight_decay": wd, "lr_scale": scale}
              for (wd, scale), names in by_group.items()]
    order = [n for names in by_group.values() for n in names]
    # The fused kernel does the whole update in one pass per tensor: ~5x faster than foreach on
    # CPU for a 0.8M-parameter model, 4% of the whole training step (BENCHMARKS.md).
    fused = all(params[n].device.type in ("cpu", "cuda") for n in order)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused,
                            foreach=None if fused else True)
    return opt, order


def _muon(cfg: TrainConfig, model: torch.nn.Module, names: list[str], lr_scale: Callable[[str], float]
          ) -> tuple[Muon, list[str]]:
    """Muon over `names`, one group per scale. The schedule's lr_at(step) is relative to cfg.lr, so a
    Muon group's lr_scale is muon_lr / lr (times lr_scale(name)): Muon follows the same warmup and
    decay, from its own, larger peak (the reference's Muon lr is ~20x its Adam lr)."""
    params, by_scale = dict(model.named_parameters()), {}
    for n in names:
        by_scale.setdefault(cfg.muon_lr / cfg.lr * lr_scale(n), []).append(n)
    groups = [{"params": [params[n] for n in group], "lr_scale": scale} for scale, group in by_scale.items()]
    opt = Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    return opt, [n for group in by_scale.values() for n in group]
