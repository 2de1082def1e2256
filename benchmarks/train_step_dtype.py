"""One training step in fp32 against bf16 autocast, paired in one process (CPU).

    python benchmarks/train_step_dtype.py [--config configs/nanogpt-cpu.toml] [--rounds 15]

Two copies of the config's model (same seed, same random batch) take turns: each round runs
`--steps` optimizer steps (forward, backward, clipping, AdamW) of one, then of the other. The
per-round ratio cancels the VM's drift; the median of those ratios is reported. Attention runs
as the trainer runs it: under CPU autocast, `layers.sdpa` keeps it in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import _common
import torch

from minillm.config import load_train_config
from minillm.torch.model import Transformer
from minillm.torch.optim import make_optimizer


def make_run(cfg, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor):
    """steps -> tokens/s of `steps` optimizer steps of a fresh model, forward under `dtype`."""
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    opt, _ = make_optimizer(cfg, model)

    def forward(m, t):
        ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
        with ctx:
            return m(t).float()  # the loss in fp32, as autocast computes it in the trainer

    return lambda steps: _common.train_steps(model, forward, opt, x, y, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/nanogpt-cpu.toml")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    args = ap.parse_args()
    cfg = load_train_config(args.config)
    shape = (cfg.batch_size, cfg.block_size)
    x, y = torch.randint(0, cfg.model.vocab_size, shape), torch.randint(0, cfg.model.vocab_size, shape)
    variants = {name: (lambda steps, run=make_run(cfg, getattr(torch, name), x, y): x.numel() / run(steps))
                for name in ("float32", "bfloat16")}  # -> seconds per step
    secs = _common.alternate(variants, args.rounds, args.steps)
    ratios = [a / b for a, b in zip(secs["float32"], secs["bfloat16"])]
    for k in variants:
        print(f"{k:9s} {statistics.median(secs[k]) * 1e3:7.2f} ms/step (median of {args.rounds} rounds)")
    print(f"bf16 autocast step speed vs fp32: {statistics.median(ratios):.2f}x "
          f"(per-round range {min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
