"""`minillm eval`: perplexity of a run's model on a token file (`minillm prepare`'s train.bin /
val.bin). The windowing and the loss are minillm.torch.evaluate.perplexity; this module only
parses arguments and prints the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minillm.data.loader import read_tokens


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a model on a token file",
        description="Mean next-token loss, perplexity and bits per token of the model in a run "
                    "directory on a .bin token file (dtype from the meta.json next to it).",
        epilog="example: minillm eval --run runs/shakespeare-char --data data/shakespeare-char")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory")
    p.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                   help="a .bin token file, or a prepared data directory (then --split picks the file)")
    p.add_argument("--split", default="val", help="file name in a data directory: SPLIT.bin (default val)")
    p.add_argument("--block-size", type=int, help="context per window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (default: all)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from minillm.torch.evaluate import perplexity
    from minillm.torch.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.data)
    if path.is_dir():
        path = path / f"{args.split}.bin"
    tokens = read_tokens(path)
    model, _ = load_model(args.run)
    block_size = args.block_size or model.config.max_seq_len
    if not 1 <= block_size <= model.config.max_seq_len:
        raise ValueError(f"--block-size must be in [1, {model.config.max_seq_len}] (the model's max_seq_len)")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.max_tokens:
        tokens = tokens[: args.max_tokens + 1]
    if len(tokens) < 2:
        raise ValueError(f"{path} holds {len(tokens)} tokens; need at least 2")
    if int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"{path} has id {int(tokens.max())}, "
                         f"outside the model's vocabulary ({model.config.vocab_size})")
    result = perplexity(model, tokens, block_size, args.batch_size)
    print(f"{path}: {result['tokens']:,} tokens, block {block_size}")
    print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
          f"{result['bits_per_token']:.4f} bits/token")
    return 0
