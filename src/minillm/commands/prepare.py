"""`minillm prepare`: text source -> tokenizer -> train.bin / val.bin / meta.json."""

from __future__ import annotations

import argparse

from minillm.data.prepare import prepare
from minillm.data.sources import SourceError


def register(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into token shards for training",
        description="Read a text source, train (or load) a tokenizer, and write train.bin, val.bin, "
                    "tokenizer.json and meta.json to --out. The last 10%% of every document goes to "
                    "val.bin. Re-running with the same source and settings does nothing.",
        epilog="examples:\n"
               "  minillm prepare --source shakespeare --tokenizer char --out data/shakespeare-char\n"
               "  minillm prepare --source 'notes/*.txt' --tokenizer bpe --vocab-size 4096 --out data/notes",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help='"shakespeare" (built in), "django-docs" or "django-code" (fetched from the '
                        'package index), a .txt/.jsonl file, a directory, a glob, or hf:<dataset>')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="char",
                   help='"char", "bpe" (trained on the source; needs --vocab-size), or a tokenizer JSON file')
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (256 bytes + merges + special tokens)")
    p.add_argument("--pattern", default="gpt4", help='BPE pre-split pattern: "gpt4", "gpt2" or a regex')
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of each document for validation")
    p.add_argument("--force", action="store_true", help="redo the work even if --out is up to date")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        meta = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       pattern=args.pattern, val_fraction=args.val_fraction, force=args.force)
    except SourceError as e:
        raise ValueError(str(e)) from None
    counts = {k: v for k, v in meta.items() if k.endswith("tokens")}
    print(f"{args.out}: vocab {meta['vocab_size']}, " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return 0
