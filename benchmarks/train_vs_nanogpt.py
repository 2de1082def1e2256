"""Training speed and time-to-loss against nanoGPT's CPU recipe, side by side in one run.

    python benchmarks/train_vs_nanogpt.py --nanogpt /path/to/nanoGPT [--rounds 2]

Needs `minillm prepare --source shakespeare --tokenizer char --out data/shakespeare-char` first.
nanoGPT trains on the same train.bin / val.bin (so the same corpus and split), from a scratch
dataset folder created inside the given clone and removed afterwards. Runs alternate: nanoGPT,
ours, nanoGPT, ours ... Reports:
  (a) tokens/s of configs/nanogpt-cpu.toml vs nanoGPT (same model and hyper-parameters), at the
      config's dtype "auto" (bf16 autocast on CPUs with native bf16; nanoGPT's CPU path is always
      fp32) and at --set dtype="float32",
  (b) training time of configs/shakespeare-char-cpu.toml until its val loss first reaches
      nanoGPT's final val loss, vs nanoGPT's training time (both exclude evaluation),
  (c) MFU: achieved training FLOP/s over this CPU's measured matmul peak in the dtype used,
  (d) our model vs transformers' GPT2LMHeadModel in the same training loop (tokens/s).
"""

from __future__ import annotations

import argparse
import json
import pickle  # only to *write* the meta.pkl nanoGPT reads; nothing is unpickled here
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT
from train_loop_vs_hf import loop_ratio  # (d), in its own file to keep this one short

from minillm.data.loader import read_meta

NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def run_nanogpt(clone: Path, data: Path, out: Path, iters: int = 2000, recipe: list[str] = NANOGPT_ARGS,
                tokens_per_iter: int = 12 * 64) -> dict:
    """nanoGPT's README CPU recipe (or another `recipe` of its train.py arguments) on our
    train/val split; returns its timings and losses."""
    name = "minillm_bench"
    ds = clone / "data" / name
    ds.mkdir(parents=True, exist_ok=True)
    meta = read_meta(data)
    for split in ("train", "val"):
        shutil.copy(data / f"{split}.bin", ds / f"{split}.bin")
    with open(ds / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    try:
        t0 = time.perf_counter()
        args = [a for a in recipe if not a.startswith(("--max_iters", "--lr_decay_iters"))]
        args += [f"--max_iters={iters}", f"--lr_decay_iters={iters}"]
        res = subprocess.run([sys.executable, "train.py", *args, f"--dataset={name}", f"--out_dir={out}"],
                             cwd=clone, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(ds, ignore_errors=True)
    iter_re = r"iter (\d+): loss [\d.]+, time ([\d.]+)ms"
    eval_re = r"step (\d+): train loss [\d.]+, val loss ([\d.]+)"
    iters = [(int(m[1]), float(m[2])) for m in re.finditer(iter_re, res.stdout)]
    evals = [(int(m[1]), float(m[2])) for m in re.finditer(eval_re, res.stdout)]
    eval_steps = {s for s, _ in evals}
    # an iteration that follows an evaluation also carries the evaluation's time: use the median there
    plain = [dt for it, dt in iters if it not in eval_steps and it > 0]
    med = statistics.median(plain)
    train_s = sum(dt if it not in eval_steps and it > 0 else med for it, dt in iters) / 1000
    return dict(ms_per_iter=med, tokens_per_s=tokens_per_iter / (med / 1000), train_s=train_s, wall_s=wall,
                final_val=evals[-1][1], evals=evals)


def run_ours(config: str, out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "minillm.cli", "train", "--config", str(ROOT / config), "--quiet",
           "--set", f'out_dir="{out}"', *[a for o in overrides for a in ("--set", o)]]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and r["step"] > 10]
    evals = [(r["step"], r["val_loss"], r["time"]) for r in rows if r.get("val_loss") is not None]
    return dict(tokens_per_s=statistics.median(speeds), train_s=rows[-1]["time"], wall_s=wall,
                final_val=evals[-1][1], evals=evals)


def matmul_peak_flops(dtype: str = "float32", n: int = 2048, reps: int = 10) -> float:
    """Best GEMM throughput of this CPU in `dtype` with torch's default threads (FLOP/s)."""
    import torch

    a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, type=Path, help="path to a local nanoGPT clone")
    ap.add_argument("--data", default=ROOT / "data" / "shakespeare-char", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2000, help="nanoGPT's max_iters (2000 is its recipe)")
    ap.add_argument("--best-steps", type=int, default=700, help="step budget of our recipe for (b)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ng, ours, ours32, best = [], [], [], []
    data = f'data_dir="{args.data.resolve()}"'
    for r in range(args.rounds):
        ng.append(run_nanogpt(args.nanogpt.resolve(), args.data.resolve(), tmp / f"ng{r}", args.iters))
        ours.append(run_ours("configs/nanogpt-cpu.toml", tmp / f"ours{r}", data, f"max_steps={args.iters}"))
        ours32.append(run_ours("configs/nanogpt-cpu.toml", tmp / f"ours32_{r}", data,
                               f"max_steps={args.iters}", 'dtype="float32"'))
        target = ng[-1]["final_val"]
        run = run_ours("configs/shakespeare-char-cpu.toml", tmp / f"best{r}", data,
                       "eval_interval=50", f"max_steps={args.best_steps}")
        hit = next(((s, v, t) for s, v, t in run["evals"] if v <= target), None)
        best.append(dict(target=target, hit=hit, final_val=run["final_val"], train_s=run["train_s"]))
        print(f"round {r}: nanoGPT {ng[-1]['tokens_per_s']:,.0f} tok/s val {target:.4f} "
              f"in {ng[-1]['train_s']:.1f}s | "
              f"ours {ours[-1]['tokens_per_s']:,.0f} tok/s val {ours[-1]['final_val']:.4f} | ours fp32 "
              f"{ours32[-1]['tokens_per_s']:,.0f} tok/s val {ours32[-1]['final_val']:.4f} | "
              f"best recipe hit {hit}", flush=True)
    import torch

    from minillm.config import ModelConfig
    from minillm.torch.model import Transformer
    from minillm.torch.train import resolve_dtype

    auto = str(resolve_dtype(torch.device("cpu"), "auto")).removeprefix("torch.")
    peak, peak_auto = matmul_peak_flops(), matmul_peak_flops(auto)
    vocab_size = read_meta(args.data)["vocab_size"]
    flops_tok = Transformer(ModelConfig.preset("gpt-char", vocab_size=vocab_size)).flops_per_token(64)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    ng_tps, our_tps = med([n["tokens_per_s"] for n in ng]), med([o["tokens_per_s"] for o in ours])
    our32_tps = med([o["tokens_per_s"] for o in ours32])
    print(f"\n(a) tokens/s: ours ({auto}) {our_tps:,.0f} vs nanoGPT (float32) {ng_tps:,.0f} "
          f"-> {our_tps / ng_tps:.2f}x; "
          f"ours float32 {our32_tps:,.0f} -> {our32_tps / ng_tps:.2f}x")
    hits = [b["hit"][2] for b in best if b["hit"]]
    ng_s = med([n["train_s"] for n in ng])
    if hits:
        final = med([b["final_val"] for b in best])
        print(f"(b) time to nanoGPT's final val loss ({med([b['target'] for b in best]):.4f}): "
              f"ours {med(hits):.1f}s vs nanoGPT {ng_s:.1f}s -> {med(hits) / ng_s:.2f}x  "
              f"(ours ends at {final:.4f})")
    else:
        print(f"(b) our recipe did not reach nanoGPT's final val loss: {best}")
    print(f"(c) MFU ({flops_tok:,} FLOPs/token): matmul peak float32 {peak / 1e9:.0f} GFLOP/s, {auto} "
          f"{peak_auto / 1e9:.0f} GFLOP/s; ours ({auto}) {our_tps * flops_tok / peak_auto:.1%}, ours float32 "
          f"{our32_tps * flops_tok / peak:.1%}, nanoGPT {ng_tps * flops_tok / peak:.1%}")
    ours_loop, hf_loop = loop_ratio()
    print(f"(d) same loop, GPT-2 shape with biases: ours {ours_loop:,.0f} tok/s vs transformers "
          f"GPT2LMHeadModel {hf_loop:,.0f} tok/s -> {ours_loop / hf_loop:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
