"""`minillm eval`: perplexity of a run's model on a token file (`minillm prepare`'s train.bin /
val.bin), or exact-match accuracy on a task set (`--tasks`). The maths is minillm.torch.evaluate's
(perplexity, answer_tasks) and minillm.data.tasks' (score); this module parses and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillm.checkpoint import load_config
from minillm.data import seq2seq_tasks, tasks
from minillm.data.loader import read_tokens


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on a token file, or exact-match accuracy on a task set",
        description="With --data: mean next-token loss, perplexity and bits per token of the model in "
                    "a run directory on a .bin token file (dtype from the meta.json next to it). With "
                    "--tasks: exact-match accuracy of greedy answers on a task set's test split.",
        epilog="examples: minillm eval --run runs/shakespeare-char --data data/shakespeare-char; "
               "minillm eval --run runs/tasks-lora --tasks builtin:shakespeare-tasks --json")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="FILE_OR_DIR",
                      help="a .bin token file, or a prepared data directory (then --split picks the file)")
    what.add_argument("--tasks", metavar="SOURCE",
                      help='a task set: "builtin:shakespeare-tasks", a JSONL file, or a directory of '
                           'SPLIT.jsonl files')
    p.add_argument("--split", help="SPLIT.bin of a data directory (default val); task split (default test)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter to merge into --run's weights")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="--tasks: put K solved train examples before each question (for a base model)")
    p.add_argument("--limit", type=int, help="--tasks: score only the first N examples")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--block-size", type=int,
                   help="context per window (default: the model's max_seq_len; longer measures length "
                        "extrapolation, except with learned positions)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows per forward pass, or questions decoded together (default 8)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (default: all)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="--tasks: longest answer generated (default 64, or half the context if smaller)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from minillm.torch.sft import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tasks and load_config(args.run).encoder_layers:  # an encoder-decoder: source in, answer out
        result = _seq2seq_tasks(args)
    else:
        model, tokenizer = load_for_inference(args.run, args.adapter)
        result = _tasks(args, model, tokenizer) if args.tasks else _perplexity(args, model)
    if args.json:
        print(json.dumps(result))
    elif args.tasks:
        print(f"{args.tasks} ({result['split']}): exact match {result['exact_match']:.3f} "
              f"({result['correct']}/{result['total']})")
        for kind, r in result["by_kind"].items():
            print(f"  {kind}: {r['exact_match']:.3f} ({r['correct']}/{r['total']})")
    else:
        print(f"{args.data}: {result['tokens']:,} tokens, block {result['block_size']}")
        print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
              f"{result['bits_per_token']:.4f} bits/token")
    return 0


def _tasks(args: argparse.Namespace, model, tokenizer) -> dict:
    from minillm.torch.evaluate import answer_tasks

    split = args.split or "test"
    examples = tasks.load_tasks(args.tasks, split)[: args.limit]
    train = tasks.load_tasks(args.tasks, "train") if args.few_shot else None
    context = model.config.max_seq_len
    new = min(64, context // 2) if args.max_new_tokens is None else args.max_new_tokens
    if not 0 < new < context:
        raise ValueError(f"--max-new-tokens {new}: must be between 1 and {context - 1} (the context - 1)")
    answers = answer_tasks(model, tokenizer, examples, train, args.few_shot, new, args.batch_size)
    return {**tasks.score(answers, examples), "split": split}


def _seq2seq_tasks(args: argparse.Namespace) -> dict:
    """Exact match of an encoder-decoder's greedy outputs for a task set's sources (data.seq2seq_tasks)."""
    from minillm.torch.seq2seq import load_seq2seq
    from minillm.torch.seq2seq_generate import transform_texts

    model, tokenizer = load_seq2seq(args.run)
    split = args.split or "test"
    examples = seq2seq_tasks.load(args.tasks, split)[: args.limit]
    new = args.max_new_tokens or model.config.max_seq_len
    outputs = transform_texts(model, tokenizer, [seq2seq_tasks.source_of(e) for e in examples], new,
                              batch_size=args.batch_size)
    return {**tasks.score(outputs, examples), "split": split}


def _perplexity(args: argparse.Namespace, model) -> dict:
    from minillm.torch.evaluate import extend_context, perplexity

    path = Path(args.data)
    if path.is_dir():
        path = path / f"{args.split or 'val'}.bin"
    tokens = read_tokens(path)
    block_size = model.config.max_seq_len if args.block_size is None else args.block_size
    if block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {block_size}")
    model = extend_context(model, block_size)  # past max_seq_len: length extrapolation
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.max_tokens:
        tokens = tokens[: args.max_tokens + 1]
    if len(tokens) < 2:
        raise ValueError(f"{path} holds {len(tokens)} tokens; need at least 2")
    if int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"{path} has id {int(tokens.max())}, "
                         f"outside the model's vocabulary ({model.config.vocab_size})")
    return {**perplexity(model, tokens, block_size, args.batch_size), "block_size": block_size}
