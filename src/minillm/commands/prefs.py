"""`minillm prefs`: on-policy preference pairs from a model and a scored task set (minillm.torch.prefs)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from minillm.data import prefs, tasks


def register(sub) -> None:
    p = sub.add_parser(
        "prefs", help="build DPO preference pairs by sampling a model on a task set",
        description="For each example of a task set's train split, sample --samples replies with the "
                    "model of --run (batched, KV-cached), score them by exact match, and write a pair: "
                    "chosen = the correct answer, rejected = the first wrong reply the model produced "
                    "(on-policy). Prompts whose samples were all correct give no pair; both that count "
                    "and the count of prompts with no correct sample are printed. The JSONL is what "
                    "`minillm align --method dpo --data FILE` reads.",
        epilog="example: minillm prefs --run runs/tasks-full --tasks builtin:shakespeare-tasks "
               "--out data/tasks-prefs.jsonl --samples 8 --temperature 1.0 --limit 2000")
    p.add_argument("--run", required=True, metavar="DIR", help="the (fine-tuned) run that samples")
    p.add_argument("--tasks", required=True, metavar="SOURCE",
                   help='a task set: "builtin:shakespeare-tasks", a JSONL file, or a directory of '
                        'SPLIT.jsonl (its train split is used)')
    p.add_argument("--out", required=True, metavar="FILE", help="the preference JSONL to write (atomically)")
    p.add_argument("--samples", type=int, default=8, metavar="K",
                   help="replies sampled per prompt (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same pairs; default 0)")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N train examples")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit (default 48)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from minillm.torch.prefs import build_pairs
    from minillm.torch.sft import load_for_inference

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = tasks.load_tasks(args.tasks, "train")[:args.limit]
    model, tokenizer = load_for_inference(args.run)
    pairs, stats = build_pairs(model, tokenizer, examples, args.samples, args.temperature, args.seed,
                               args.max_new_tokens, args.batch_size)
    if not pairs:
        raise ValueError(f"every one of the {stats.prompts} prompts was answered correctly in all "
                         f"{args.samples} samples: no pair to write (raise --temperature or --samples)")
    prefs.write_pairs(pairs, args.out)
    if args.json:
        print(json.dumps({**dataclasses.asdict(stats), "out": str(args.out)}))
    else:
        print(f"{stats.pairs} pairs from {stats.prompts} prompts written to {args.out}; {stats.no_wrong} "
              f"prompts gave no wrong sample (no pair), {stats.all_wrong} had no correct sample")
    return 0
