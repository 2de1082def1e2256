"""`minillm prune`: zero or remove the weights that matter least, giving a new run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillm.checkpoint import check_data_dir, save_run
from minillm.data.loader import BatchLoader

METHODS = ("magnitude", "2:4", "heads", "channels")  # minillm.torch.prune.METHODS (no torch import here)


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune a run: magnitude, 2:4, attention heads or MLP channels",
        description="Write a pruned copy of a run. magnitude / 2:4 zero weights of the blocks' Linear layers "
                    "(config.json records which under \"prune\", so `minillm finetune --method full` and "
                    "`minillm distill --init` keep them zero); heads / channels remove whole attention heads "
                    "or MLP channels by importance, giving a smaller, faster model (a smaller config).",
        epilog="example: minillm prune --run runs/base --method channels --sparsity 0.25 "
               "--calibration data/shakespeare-bpe --out runs/base-pruned")
    p.add_argument("--run", required=True, metavar="DIR", help="the run to prune (any run `sample` reads)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights (magnitude) / heads / channels to remove (2:4 is always 0.5)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="magnitude: the sparsity holds in every matrix (layer) or over all of them (global)")
    p.add_argument("--calibration", metavar="DATA_DIR",
                   help="heads / channels: score by activations on this data's train split (Wanda), "
                        "not by weight norms alone")
    p.add_argument("--calibration-batches", type=int, default=8, metavar="N", help="batches of 8 sequences")
    p.add_argument("--out", required=True, metavar="DIR", help="the pruned run directory (must not exist)")
    p.add_argument("--json", action="store_true", help="print the prune record as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillm.torch import prune
    from minillm.torch.model import model_params
    from minillm.torch.sft import load_for_inference

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} already exists; prune writes a new run directory")
    if args.method == "2:4":
        args.sparsity = 0.5
    model, tokenizer = load_for_inference(args.run)
    rms = None
    if args.calibration and args.method in ("heads", "channels"):
        rms = prune.input_rms(model, calibration_batches(args.calibration, model.config.vocab_size,
                                                         model.config.max_seq_len,
                                                         args.calibration_batches))
    config, params, record = prune.prune(model.config, model_params(model), args.method, args.sparsity,
                                         args.scope, rms)
    save_run(out, config, tokenizer, params, extra_config={"prune": record, "pruned_from": str(args.run)})
    if args.json:
        print(json.dumps(record | {"masked": len(record.get("masked", []))}))
    else:
        print(f"{args.method} pruning: {100 * record['reached']:.1f}% removed; run written to {out}")
    return 0


def calibration_batches(data_dir: str, vocab_size: int, max_seq_len: int, n: int):
    """n batches (8, T) of token ids from the train split, T = min(256, max_seq_len), as tensors."""
    import torch

    check_data_dir(data_dir, vocab_size)  # the data's tokens must be this model's
    loader = BatchLoader(data_dir, min(256, max_seq_len), 8, split="train", seed=0)
    return [torch.from_numpy(loader.next_batch()[0]).long() for _ in range(n)]
