"""`minillm inspect`: size a model before training it."""

from __future__ import annotations

import argparse

from minillm.config import ModelConfig, load_train_config


def register(sub) -> None:
    p = sub.add_parser("inspect", help="parameters, FLOPs per token and training memory of a config",
                       description="Print parameter count, FLOPs per token and an estimate of the memory "
                                   "training needs, so a run can be sized before it starts.")
    p.add_argument("--config", help="train/model TOML file (as for `minillm train`)")
    p.add_argument("--preset", help="a model preset instead of --config (e.g. gpt2-small, llama-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.d_model=256 --set batch_size=32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the parameter count, FLOPs per token and a training-memory estimate (fp32 weights +
    grads + AdamW's two moments = 16 bytes per parameter, plus activations saved for backward)."""
    if args.preset:
        train, model = None, ModelConfig.preset(args.preset)
    elif args.config:
        train = load_train_config(args.config, args.overrides)
        model = train.model
    else:
        raise ValueError("give --config FILE or --preset NAME")
    import torch

    from minillm.torch.model import Transformer

    with torch.device("meta"):  # shapes only: no memory, no init
        net = Transformer(model)
    n_params = net.num_parameters()
    T = train.block_size if train else model.max_seq_len
    lines = [f"parameters        {n_params:,} ({n_params / 1e6:.2f}M)",
             f"FLOPs per token   {net.flops_per_token(T):,} (training: 6N + 12·L·D·T at T={T})",
             f"weights (fp32)    {n_params * 4 / 2**20:,.1f} MiB"]
    if train:
        micro = train.batch_size // train.grad_accum
        # per layer and token, roughly: ~16 D-sized tensors saved (norms, q/k/v/o, MLP in/out at
        # d_ff) plus attention's H x T scores; logits add vocab per token.
        per_layer = 10 * model.d_model + 3 * model.d_ff + model.n_heads * T
        per_token = model.n_layers * per_layer + 2 * model.vocab_size
        act = micro * T * per_token * 4
        lines += [f"training state    {n_params * 16 / 2**20:,.1f} MiB (weights, grads, AdamW moments)",
                  f"activations       ~{act / 2**20:,.1f} MiB (micro-batch {micro} x {T} tokens, fp32)",
                  f"tokens per step   {train.batch_size * T:,}"]
    print("\n".join(lines))
    return 0
