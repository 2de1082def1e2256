"""`minillm distill`: train a student on token shards and on a frozen teacher's softened logits."""

from __future__ import annotations

import argparse
import dataclasses

from minillm.checkpoint import load_config
from minillm.config import load_train_config
from minillm.train_loop import train

# --set keys of the distillation itself and their types; the rest are TrainConfig's
DISTILL_KEYS = {"alpha": float, "temperature": float, "top_k": int, "cache_dtype": str}


def register(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a student on data plus a teacher's softened logits (Hinton et al. 2015)",
        description="Like `minillm train` (same TOML, same run directory, Ctrl-C saves, --resume continues), "
                    "with loss (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T); the teacher runs "
                    "on the same batches and must use the data's tokenizer. --init starts the student from "
                    "another run's weights and config (e.g. a `minillm prune` output: recovery training, "
                    "its pruned weights kept at zero). --teacher-cache runs the teacher once instead, over "
                    "the training split in windows of block_size, keeps its top_k tokens per position "
                    "(log-probs at the temperature) in DIR, and trains the student on those windows: a "
                    "step then costs about what it costs without a teacher. The cache is reused while its "
                    "record (teacher weights, data, block_size, top_k, temperature, cache_dtype) matches, "
                    "rebuilt otherwise.",
        epilog="examples: minillm distill --teacher runs/base --config configs/student.toml "
               "--set alpha=0.5 --set temperature=2; minillm distill --teacher runs/base "
               "--config configs/student.toml --teacher-cache runs/base-cache --set top_k=32")
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher run (frozen)")
    p.add_argument("--config", required=True, help="TOML of the student run (TrainConfig keys, [model])")
    p.add_argument("--init", metavar="DIR", help="start the student from this run (its model config wins)")
    p.add_argument("--teacher-cache", metavar="DIR",
                   help="cache the teacher's top-k log-probs in DIR (built on first use) and train from it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="alpha=0.5, temperature=2.0; with --teacher-cache top_k=32, "
                        "cache_dtype=float16|float32; or any `minillm train` key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar (off anyway when not a terminal)")
    p.set_defaults(func=run)


def split_overrides(overrides: list[str]) -> tuple[dict[str, float | int | str], list[str]]:
    """(the DistillConfig values among the overrides, the TrainConfig overrides)."""
    ours, rest = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        kind = DISTILL_KEYS.get(key.strip())
        if kind is None:
            rest.append(item)
            continue
        try:
            ours[key.strip()] = kind(value.strip())
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"--set {item}: {key.strip()} must be {what}") from None
    return ours, rest


def run(args: argparse.Namespace) -> int:
    from minillm.torch.distill import DistillConfig, DistillTrainer

    values, overrides = split_overrides(args.overrides)
    if not args.teacher_cache and {"top_k", "cache_dtype"} & set(values):
        raise ValueError(f"--set {'/'.join(sorted({'top_k', 'cache_dtype'} & set(values)))} is a setting of "
                         f"the teacher cache: give --teacher-cache DIR too")
    dc = DistillConfig(teacher=args.teacher, init=args.init, teacher_cache=args.teacher_cache, **values)
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
