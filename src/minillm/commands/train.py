"""`minillm train`: train a model from prepared token shards into a run directory."""

from __future__ import annotations

import argparse
import os

from minillm.config import load_train_config
from minillm.train_loop import train
from minillm.trainers import make_trainer


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on prepared data",
        description="Train a model from a TOML config (top-level TrainConfig keys and a [model] table) "
                    "on token shards made by `minillm prepare`. Writes config.json, tokenizer.json, "
                    "model.safetensors, trainer_state.*, metrics.jsonl, loss.png and best/ to out_dir. "
                    "Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.",
        epilog="example: minillm train --config configs/shakespeare-char-cpu.toml --set max_steps=500")
    p.add_argument("--config", required=True, help="TOML file, e.g. configs/shakespeare-char-cpu.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value: --set lr=3e-3 --set model.n_layers=6 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    p.add_argument("--backend", choices=("torch", "jax"), help="framework (default: the config's backend)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (off anyway when not a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f'backend="{args.backend}"'] if args.backend else [])
    cfg = load_train_config(args.config, overrides)
    summary = train(make_trainer(cfg, resume=args.resume, quiet=True if args.quiet else None))
    if summary.get("interrupted"):
        return 130
    if os.environ.get("RANK", os.environ.get("JAX_PROCESS_ID", "0")) == "0":  # one summary line, from rank 0
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
              f"{summary.get('tokens_per_s', 0):,.0f} tokens/s; run directory {cfg.out_dir}")
    return 0
