"""On a CUDA GPU: nanoGPT's README GPU recipe against ours, PyTorch and JAX, on the same data.

    python benchmarks/gpu_vs_nanogpt.py --nanogpt /path/to/nanoGPT [--steps 1000]

Needs `minillm prepare --source shakespeare --tokenizer char --out data/shakespeare-char`.
nanoGPT runs `config/train_shakespeare_char.py` as its README says (6 x 384, block 256, batch
64, torch.compile, bf16 autocast); ours runs configs/nanogpt-gpu.toml, the same recipe value for
value (compile = true, dtype "auto" = bf16 autocast), once with the PyTorch trainer and once
with the JAX one (jit, bf16 compute on float32 master weights). All three train `--steps`
steps, the cosine schedule shortened to that length, with one evaluation at the end. Reports
median tokens/s after warm-up, MFU against the dense bf16 peak given by --peak-tflops, and the
final validation loss.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import ROOT
from train_vs_nanogpt import run_nanogpt, run_ours

from minillm.data.loader import read_meta

RECIPE = ["config/train_shakespeare_char.py", "--log_interval=1"]
TOKENS_PER_STEP = 64 * 256


def flops_per_token(data: Path) -> float:
    """Training FLOPs per token of the recipe's model (PaLM's 6N + 12 L D T, as minillm inspect)."""
    from minillm.config import ModelConfig
    from minillm.torch.model import Transformer

    vocab = read_meta(data)["vocab_size"]
    config = ModelConfig(vocab_size=vocab, max_seq_len=256, d_model=384, n_layers=6, n_heads=6, d_ff=1536,
                         norm="layernorm", positions="learned", mlp="gelu_exact", bias=False)
    return Transformer(config).flops_per_token()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="a local clone of karpathy/nanoGPT")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the GPU (989: H100/H200 SXM)")
    args = ap.parse_args()
    data = ROOT / "data" / "shakespeare-char"
    fpt = flops_per_token(data)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = RECIPE + [f"--eval_interval={args.steps}"]  # evaluates at 0 and at the end
        clone = args.nanogpt.resolve()
        nano = run_nanogpt(clone, data, Path(tmp) / "nano", args.steps, recipe, TOKENS_PER_STEP)
        sets = [f"max_steps={args.steps}", "eval_interval=0"]  # 0: one evaluation, at the end
        ours = {b: run_ours("configs/nanogpt-gpu.toml", Path(tmp) / b, *sets, f'backend="{b}"')
                for b in ("torch", "jax")}
    print(f"{args.steps} steps of {TOKENS_PER_STEP} tokens; {fpt / 1e6:.1f} MFLOP/token; "
          f"peak {args.peak_tflops:.0f} TFLOP/s")
    print("| | tokens/s | x nanoGPT | MFU | final val loss | wall s |\n|---|---:|---:|---:|---:|---:|")
    for name, r in [("nanoGPT", nano), ("minillm torch", ours["torch"]), ("minillm jax", ours["jax"])]:
        mfu = r["tokens_per_s"] * fpt / (args.peak_tflops * 1e12)
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / nano['tokens_per_s']:.2f}x | "
              f"{mfu:.1%} | {r['final_val']:.4f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
