"""`minillm eval`: perplexity of a run's model on a token file.

The file is a flat array of token ids (`minillm prepare` writes train.bin / val.bin) whose dtype
(uint16 or uint32) comes from the meta.json next to it. It is cut into consecutive windows of
block_size + 1 tokens overlapping by one, so every token after the first is predicted exactly
once, from up to block_size tokens of context. Loss is the mean next-token cross-entropy in
nats; perplexity = exp(loss); bits per token = loss / ln 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a token file",
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


def token_file(data: str, split: str):
    """(path of the .bin file, numpy dtype) for --data; errors that say what is missing."""
    import numpy as np

    path = Path(data)
    if path.is_dir():
        path = path / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    meta = path.parent / "meta.json"
    if not meta.is_file():
        raise ValueError(f"{meta} not found: it gives the dtype of {path.name} (written by `minillm prepare`)")
    try:
        dtype = np.dtype(json.loads(meta.read_text(encoding="utf-8"))["dtype"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta}: no readable 'dtype' field ({e})") from None
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"{meta}: dtype must be uint16 or uint32, got {dtype}")
    return path, dtype


def perplexity(model, tokens, block_size: int, batch_size: int = 8) -> dict:
    """Mean next-token loss over a 1-D array of ids -> {"tokens", "loss", "perplexity", "bits_per_token"}."""
    import numpy as np
    import torch.nn.functional as F

    import torch

    n_windows = math.ceil((len(tokens) - 1) / block_size)
    total, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, n_windows, batch_size):
            windows = [np.asarray(tokens[i * block_size:(i + 1) * block_size + 1], dtype=np.int64)
                       for i in range(first, min(first + batch_size, n_windows))]
            for length in sorted({len(w) for w in windows}):  # the last window may be shorter
                batch = torch.from_numpy(np.stack([w for w in windows if len(w) == length]))  # (B, T+1)
                logits = model(batch[:, :-1])  # (B, T, V)
                total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
                count += batch[:, 1:].numel()
    loss = total / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2)}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import torch
    from minillm.torch.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path, dtype = token_file(args.data, args.split)
    model, _ = load_model(args.run)
    block_size = args.block_size or model.config.max_seq_len
    if not 1 <= block_size <= model.config.max_seq_len:
        raise ValueError(f"--block-size must be in [1, {model.config.max_seq_len}] (the model's max_seq_len)")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if args.max_tokens:
        tokens = tokens[: args.max_tokens + 1]
    if len(tokens) < 2:
        raise ValueError(f"{path} holds {len(tokens)} tokens; need at least 2")
    if int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"{path} has id {int(tokens.max())}, outside the model's vocabulary ({model.config.vocab_size})")
    result = perplexity(model, tokens, block_size, args.batch_size)
    print(f"{path}: {result['tokens']:,} tokens, block {block_size}")
    print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
          f"{result['bits_per_token']:.4f} bits/token")
    return 0
