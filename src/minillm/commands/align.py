"""`minillm align`: DPO, IPO or GRPO on top of a fine-tuned run (minillm.align)."""

from __future__ import annotations

import argparse
import dataclasses

from minillm.align import METHODS, AlignConfig, align_configs
from minillm.train_loop import train


def register(sub) -> None:
    keys = ", ".join(f.name for f in dataclasses.fields(AlignConfig)[3:])
    p = sub.add_parser(
        "align", help="align a fine-tuned run with DPO, IPO or GRPO",
        description="Preference optimisation of an SFT run (`minillm finetune`), whose merged weights "
                    "are both the start and the frozen reference. --method dpo|ipo trains on preference "
                    "pairs (a JSONL of {\"prompt\" or \"messages\", \"chosen\", \"rejected\"}, e.g. made "
                    "by `minillm prefs`); --method grpo samples groups of replies to a task set's "
                    "prompts and learns from their rewards. lora_rank=0 (default) trains every weight "
                    "(model.safetensors); lora_rank=R trains an adapter on the SFT weights, the reference "
                    "being the adapter off (adapter.safetensors). metrics.jsonl logs the loss, reward "
                    "margins and accuracy, chosen / rejected log-probs and the KL to the reference. "
                    "Ctrl-C saves, --resume continues exactly; `minillm sample/chat/eval --run OUT` use "
                    "the result.",
        epilog="example: minillm align --run runs/tasks-full --method dpo --data data/tasks-prefs.jsonl "
               "--out runs/tasks-dpo --set beta=0.1 --set max_steps=200")
    p.add_argument("--run", required=True, metavar="SFT_RUN", help="the fine-tuned run directory")
    p.add_argument("--method", required=True, choices=METHODS, help="the alignment objective")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="dpo/ipo: a preference JSONL; grpo: a task set (\"builtin:shakespeare-tasks\", "
                        "a JSONL file, or a directory of SPLIT.jsonl)")
    p.add_argument("--out", required=True, metavar="DIR", help="the new run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a training setting (lr, max_steps, batch_size = pairs or prompts, ...) or one "
                        f"of: {keys}")
    p.add_argument("--resume", action="store_true", help="continue --out's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg, ac = align_configs(args.run, args.data, args.out, args.method, args.overrides)
    if cfg.backend != "torch":
        raise ValueError("alignment runs on the torch backend only")
    quiet = True if args.quiet else None
    if ac.method == "grpo":
        from minillm.torch.grpo_train import GRPOTrainer

        trainer = GRPOTrainer(cfg, ac, resume=args.resume, quiet=quiet)
    else:
        from minillm.torch.dpo_train import DPOTrainer

        trainer = DPOTrainer(cfg, ac, resume=args.resume, quiet=quiet)
    summary = train(trainer)
    if summary.get("interrupted"):
        return 130
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}; run directory {args.out}")
    return 0
