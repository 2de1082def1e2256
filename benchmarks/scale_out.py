"""Scale-out on this machine: tokens/s and peak memory per rank of 1 process, 2-rank DDP and 2-rank
FSDP (torchrun, gloo), next to `minillm inspect`'s estimate for each.

    python benchmarks/scale_out.py [--size small|full] [--steps 20] [--json]

Each variant is `minillm.torch.train.Trainer` taking `--steps` optimizer steps (after 2 warm-up
steps) on the same global batch, without evaluation or checkpoints. Memory per rank is the growth
of the process's peak resident set (VmHWM in /proc/self/status) over its resident set after the
imports, before the model exists: what training itself added. On a CPU the point is memory and
correctness, not speed: the ranks share the machine's cores, and gloo all-reduces through memory.

Each variant runs twice: with glibc's default allocator settings, and with MALLOC_MMAP_THRESHOLD_
fixed at 128 KiB. By default glibc raises that threshold as large blocks are freed, then serves
them from its heap, which keeps freed memory resident; FSDP gathers and frees every block's weights
and gradients each step, so its resident peak grows well past what is live at any moment (on CPUs:
set the variable for FSDP runs). The second column is what `minillm inspect` estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

SIZES = {  # memory large enough to dwarf the runtime's noise: "small" ~7M parameters, "full" ~25M
    "small": ["model.d_model=384", "model.n_layers=4", "model.n_heads=6", "batch_size=8", "block_size=128"],
    "full": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "batch_size=8", "block_size=128"],
}
COMMON = ['dtype="float32"', "eval_interval=0", "checkpoint_interval=0", "grad_accum=1", "warmup_steps=0",
          "model.max_seq_len=128", "model.dropout=0.0", "log_interval=1000000"]
VARIANTS = {"1 process": (1, "ddp"), "2-rank DDP": (2, "ddp"), "2-rank FSDP": (2, "fsdp")}


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak so far)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    """One rank: build the trainer, take the steps, write {tokens_per_s, peak_bytes} for this rank."""
    from minillm.config import load_train_config
    from minillm.torch.train import Trainer

    cfg = load_train_config(args.config, args.set)
    warm_runtime()
    baseline = status_kib("VmRSS")
    trainer = Trainer(cfg, quiet=True)
    for _ in range(2):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": args.steps * cfg.batch_size * cfg.block_size / seconds,
              "peak_bytes": (status_kib("VmHWM") - baseline) * 1024}
    Path(args.out, f"rank{trainer.rank}.json").write_text(json.dumps(result))


def warm_runtime() -> None:
    """Pay the runtime's one-time costs (thread pools, kernel caches, the process group) on a tiny
    model before the baseline, so that the growth measured is what the model itself needs."""
    import torch

    from minillm.config import ModelConfig
    from minillm.torch.model import Transformer, next_token_loss
    from minillm.torch.train import setup_distributed

    _, world = setup_distributed()
    model = Transformer(ModelConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layers=1, n_heads=2))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randint(0, 32, (2, 16))
    next_token_loss(model(x), x).backward()
    opt.step()
    if world > 1:
        torch.distributed.all_reduce(torch.ones(8))


def measure(name: str, world: int, parallel: str, config: Path, overrides: list[str], steps: int,
            tmp: Path) -> dict:
    """Launch one variant; per-rank measurements and inspect's estimate for it."""
    from minillm.config import load_train_config
    from minillm.memory import memory_per_rank, peak

    out = tmp / name.replace(" ", "_")
    out.mkdir()
    sets = [*overrides, f'parallel="{parallel}"', f'out_dir="{out}"']
    me = [str(Path(__file__).resolve()), "--worker", "--config", str(config), "--steps", str(steps),
          "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
              if world > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    peaks = {}
    for allocator, extra in (("glibc_default", {}), ("mmap_128k", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        subprocess.run(launch + me, check=True, env={**env, **extra}, cwd=_common.ROOT, capture_output=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        peaks[allocator] = [round(r["peak_bytes"] / 2**20, 1) for r in ranks]
    estimate = memory_per_rank(load_train_config(config, sets), world)
    return {"variant": name, "ranks": world, "tokens_per_s": ranks[0]["tokens_per_s"],
            "peak_MiB_per_rank": peaks,
            "inspect_MiB": round(peak(estimate) / 2**20, 1),
            "inspect_parts_MiB": {k: round(v / 2**20, 1) for k, v in estimate.items()}}


def prepare(tmp: Path) -> Path:
    """A character-level data set and a config pointing at it."""
    text = "".join(f"{w}: the {n} of {p} doth {v}.\n" for w in ("ROMEO", "JULIET", "LEAR", "HAMLET")
                   for n in ("crown", "night", "word") for p in ("Verona", "Denmark")
                   for v in ("bear", "keep"))
    (tmp / "corpus.txt").write_text(text * 20)
    subprocess.run([sys.executable, "-m", "minillm.cli", "prepare", "--source", str(tmp / "corpus.txt"),
                    "--tokenizer", "char", "--out", str(tmp / "char")], check=True, capture_output=True)
    config = tmp / "scale_out.toml"
    config.write_text(f'data_dir = "{tmp / "char"}"\nout_dir = "{tmp / "run"}"\n')
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        config = prepare(Path(tmp))
        rows = [measure(name, world, parallel, config, COMMON + SIZES[args.size], args.steps, Path(tmp))
                for name, (world, parallel) in VARIANTS.items()]
    if args.json:
        print(json.dumps({"machine": _common.machine(), "size": args.size, "rows": rows}))
        return
    print(f"# scale_out.py --size {args.size} --steps {args.steps}; {_common.machine()}")
    print(f"{'variant':<13} {'tokens/s':>9} {'peak MiB/rank, glibc':>22} {'.., mmap 128k':>16} "
          f"{'inspect MiB':>12} {'ratio':>6}")
    for r in rows:
        default, mmap = r["peak_MiB_per_rank"]["glibc_default"], r["peak_MiB_per_rank"]["mmap_128k"]
        print(f"{r['variant']:<13} {r['tokens_per_s']:>9,.0f} {str(default):>22} {str(mmap):>16} "
              f"{r['inspect_MiB']:>12,.1f} {r['inspect_MiB'] / max(mmap):>6.2f}")
        print(f"{'':<13} inspect parts: {r['inspect_parts_MiB']}")


if __name__ == "__main__":
    main()
