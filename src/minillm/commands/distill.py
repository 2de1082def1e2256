"""`minillm distill`: train a student on token shards and on a frozen teacher's softened logits."""

from __future__ import annotations

import argparse
import dataclasses

from minillm.checkpoint import load_config
from minillm.config import load_train_config
from minillm.train_loop import train

DISTILL_KEYS = ("alpha", "temperature")  # --set keys of the distillation itself; the rest are TrainConfig's


def register(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a student on data plus a teacher's softened logits (Hinton et al. 2015)",
        description="Like `minillm train` (same TOML, same run directory, Ctrl-C saves, --resume continues), "
                    "with loss (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T); the teacher runs "
                    "on the same batches and must use the data's tokenizer. --init starts the student from "
                    "another run's weights and config (e.g. a `minillm prune` output: recovery training, "
                    "its pruned weights kept at zero).",
        epilog="example: minillm distill --teacher runs/base --config configs/student.toml "
               "--set alpha=0.5 --set temperature=2")
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher run (frozen)")
    p.add_argument("--config", required=True, help="TOML of the student run (TrainConfig keys, [model])")
    p.add_argument("--init", metavar="DIR", help="start the student from this run (its model config wins)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="alpha=0.5, temperature=2.0, or any `minillm train` key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar (off anyway when not a terminal)")
    p.set_defaults(func=run)


def split_overrides(overrides: list[str]) -> tuple[dict[str, float], list[str]]:
    """(alpha / temperature values, the TrainConfig overrides)."""
    ours, rest = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() not in DISTILL_KEYS:
            rest.append(item)
            continue
        try:
            ours[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--set {item}: {key.strip()} must be a number") from None
    return ours, rest


def run(args: argparse.Namespace) -> int:
    from minillm.torch.distill import DistillConfig, DistillTrainer

    values, overrides = split_overrides(args.overrides)
    dc = DistillConfig(teacher=args.teacher, init=args.init, **values)
    cfg = load_train_config(args.config, overrides)
    if cfg.backend != "torch":
        raise ValueError("minillm distill runs on the torch backend (backend = \"torch\")")
    if args.init:
        cfg = dataclasses.replace(cfg, model=load_config(args.init))
    summary = train(DistillTrainer(cfg, dc, resume=args.resume, quiet=True if args.quiet else None))
    if summary.get("interrupted"):
        return 130
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}; run directory {cfg.out_dir}")
    return 0
