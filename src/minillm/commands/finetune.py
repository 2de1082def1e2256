"""`minillm finetune`: supervised fine-tuning of a trained run, full or LoRA (minillm.finetune)."""

from __future__ import annotations

import argparse
import dataclasses

from minillm.finetune import FinetuneConfig, finetune_configs
from minillm.train_loop import train


def register(sub) -> None:
    keys = ", ".join(f.name for f in dataclasses.fields(FinetuneConfig)[2:])
    p = sub.add_parser(
        "finetune", help="fine-tune a trained run on conversations (full or LoRA)",
        description="Supervised fine-tuning: conversations rendered with the chat template, loss on the "
                    "assistant's replies only. --method full trains every weight and writes "
                    "model.safetensors; --method lora trains low-rank adapters on the frozen base and "
                    "writes adapter.safetensors + adapter.json (use it with --adapter, or `minillm "
                    "merge`). The run directory also holds config.json (naming its base), "
                    "tokenizer.json, trainer_state.*, metrics.jsonl and loss.png; Ctrl-C saves, "
                    "--resume continues exactly.",
        epilog="example: minillm finetune --run runs/shakespeare-bpe-base --data builtin:shakespeare-tasks "
               "--method lora --out runs/tasks-lora --set lora_rank=32 --set max_steps=500")
    p.add_argument("--run", required=True, metavar="DIR", help="the base run directory")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help='"builtin:shakespeare-tasks" or a JSONL file of {"messages": [...]} or '
                        '{"prompt": ..., "completion": ...} lines')
    p.add_argument("--method", choices=("full", "lora"), default="lora", help="what trains (default lora)")
    p.add_argument("--out", required=True, metavar="DIR", help="the new run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a training setting (lr, max_steps, batch_size, ...) or one of: {keys}")
    p.add_argument("--resume", action="store_true", help="continue --out's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillm.torch.sft import FinetuneTrainer

    cfg, ft = finetune_configs(args.run, args.data, args.out, args.method, args.overrides)
    if cfg.backend != "torch":
        raise ValueError("fine-tuning runs on the torch backend only")
    summary = train(FinetuneTrainer(cfg, ft, resume=args.resume, quiet=True if args.quiet else None))
    if summary.get("interrupted"):
        return 130
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}; run directory {args.out}")
    return 0
