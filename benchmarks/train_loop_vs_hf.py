"""Our Transformer vs transformers' GPT2LMHeadModel in the same training loop (tokens/s).

    python benchmarks/train_loop_vs_hf.py

Same shape (gpt-char with biases, as GPT-2 has them), same random batch, same AdamW; the two
models alternate in blocks of steps after a warm-up, and the medians are compared.
"""

from __future__ import annotations

import statistics

import _common
import torch


def loop_ratio(batch: int = 12, block: int = 64, steps: int = 20, rounds: int = 5) -> tuple[float, float]:
    """(our tokens/s, HF tokens/s), medians over `rounds` alternating blocks of `steps` steps."""
    from minillm.config import ModelConfig
    from minillm.interop import hf
    from minillm.torch.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("gpt-char", vocab_size=90, bias=True)
    ours = Transformer(cfg)
    theirs = hf.to_transformers(ours).train()
    x, y = torch.randint(0, 90, (batch, block)), torch.randint(0, 90, (batch, block))
    runs = {
        "ours": (ours, lambda m, t: m(t)),
        "hf": (theirs, lambda m, t: m(input_ids=t).logits),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99)) for k, (m, _) in runs.items()}
    timed = {k: (lambda n, m=m, f=f, opt=opts[k]: _common.train_steps(m, f, opt, x, y, n))
             for k, (m, f) in runs.items()}
    speeds = _common.alternate(timed, rounds, steps, warmup=5)
    return statistics.median(speeds["ours"]), statistics.median(speeds["hf"])


if __name__ == "__main__":
    o, h = loop_ratio()
    print(f"ours {o:,.0f} tokens/s, transformers GPT2LMHeadModel {h:,.0f} tokens/s -> {o / h:.2f}x")
