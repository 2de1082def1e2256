"""AdamW for the PyTorch trainer: which parameters decay, and the optimizer over the two groups.
The learning rate (minillm.schedule.lr_at) and clipping are applied by Trainer.train_step.
"""

from __future__ import annotations

import torch

from minillm.config import TrainConfig


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names (with weight decay, without): matrices (Q, K, V, O, MLP, an untied head) decay;
    embeddings, norm gains and biases do not. A tied embedding is one name (tok_emb.weight).
    Frozen parameters (requires_grad False, e.g. the base under LoRA) are in neither list."""
    mask = {name: p.dim() >= 2 and name not in ("tok_emb.weight", "pos_emb.weight")
            for name, p in model.named_parameters() if p.requires_grad}
    return [n for n, d in mask.items() if d], [n for n, d in mask.items() if not d]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW (Loshchilov & Hutter 2019) with two parameter groups, weight decay on decay_split's;
    returns (optimizer, names in optimizer order) so checkpoints store the moments by name."""
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass per tensor: ~5x faster than foreach on
    # CPU for a 0.8M-parameter model, 4% of the whole training step (BENCHMARKS.md).
    fused = all(params[n].device.type in ("cpu", "cuda") for n in decay + no_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused,
                            foreach=None if fused else True)
    return opt, decay + no_decay
