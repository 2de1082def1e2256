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
import time

import torch

from minillm.config import load_train_config
from minillm.torch.model import Transformer, next_token_loss
from minillm.torch.trainer_state import build_optimizer


def make_step(cfg, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    opt, _ = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)

    def step() -> float:
        ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
        with ctx:
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/nanogpt-cpu.toml")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    args = ap.parse_args()
    cfg = load_train_config(args.config)
    shape = (cfg.batch_size, cfg.block_size)
    x, y = torch.randint(0, cfg.model.vocab_size, shape), torch.randint(0, cfg.model.vocab_size, shape)
    variants = {"float32": make_step(cfg, torch.float32, x, y), "bfloat16": make_step(cfg, torch.bfloat16, x, y)}
    for step in variants.values():  # warm-up
        for _ in range(args.steps):
            step()
    secs = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, step in variants.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            secs[k].append((time.perf_counter() - t) / args.steps)
    ratios = [a / b for a, b in zip(secs["float32"], secs["bfloat16"])]
    for k in variants:
        print(f"{k:9s} {statistics.median(secs[k]) * 1e3:7.2f} ms/step (median of {args.rounds} rounds)")
    print(f"bf16 autocast step speed vs fp32: {statistics.median(ratios):.2f}x "
          f"(per-round range {min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
