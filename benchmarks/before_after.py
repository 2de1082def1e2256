"""The same training and decoding runs on two checkouts of minillm (e.g. before and after a
refactor), in fresh processes, alternating which goes first, on this machine's one venv.

    git worktree add /tmp/old <commit>
    python benchmarks/before_after.py --old /tmp/old [--new .] [--rounds 2]

Training: `minillm train` with configs/shakespeare-char-cpu.toml (700 steps: tokens/s and the
training time to step 650) and configs/nanogpt-cpu.toml (600 steps, no eval: tokens/s), median
tokens/s after step 10. Decoding: greedy `generate` after a 16-token prompt on random
llama-tiny (64 tokens) and gpt2-small (32 tokens) weights, eager and compiled, best of 3.
Prints new/old ratios per round; a refactor that only moved code should read ~1.0 (this
machine's noise is +-10% between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT

TRAIN = {"shakespeare-char-cpu": ["max_steps=700"], "nanogpt-cpu": ["max_steps=600", "eval_interval=0"]}
DECODE = r'''
import time, torch
from minillm.config import ModelConfig
from minillm.torch.generate import generate
from minillm.torch.model import Transformer
torch.manual_seed(0)
model, prompt = Transformer(ModelConfig.preset("{preset}")).eval(), list(range(1, 17))
for compile in (False, True):
    generate(model, prompt, 8, temperature=0, compile=compile)  # warm-up (and compilation)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        generate(model, prompt, {n}, temperature=0, compile=compile)
        times.append(time.perf_counter() - t)
    print("compiled" if compile else "eager", {n} / min(times))
'''


def train_run(src: Path, config: str, sets: list[str]) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "minillm.cli", "train", "--config", f"configs/{config}.toml", "--quiet",
           "--set", f'out_dir="{out}"', *[a for s in sets for a in ("--set", s)]]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(src / "src")}, check=True,
                   capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    at_650 = [r["time"] for r in rows if r.get("val_loss") is not None and r["step"] >= 650]
    return {"tokens/s": statistics.median(r["tokens_per_s"] for r in rows
                                          if r.get("tokens_per_s") and r["step"] > 10),
            **({"s to step 650": at_650[0]} if at_650 else {})}


def decode_run(src: Path, preset: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", DECODE.format(preset=preset, n=n)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(src / "src")}, check=True).stdout
    return {f"{mode} tok/s": float(value) for mode, value in (line.split() for line in out.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the earlier commit")
    ap.add_argument("--new", type=Path, default=ROOT, help="checkout of the later commit (default: this one)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    jobs = {f"train {c}": (train_run, (c, s)) for c, s in TRAIN.items()}
    jobs.update({f"decode {p}": (decode_run, (p, n)) for p, n in (("llama-tiny", 64), ("gpt2-small", 32))})
    results = {(job, side): [] for job in jobs for side in ("old", "new")}
    for r in range(args.rounds):
        for job, (run, job_args) in jobs.items():
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                results[(job, side)].append(run(getattr(args, side).resolve(), *job_args))
                print(f"round {r} {side}: {job} {results[(job, side)][-1]}", flush=True)
    print("\n| run | figure | old (median) | new (median) | new/old per round |\n|---|---|---:|---:|---|")
    for job in jobs:
        old, new = results[(job, "old")], results[(job, "new")]
        for key in old[0]:
            ratios = ", ".join(f"{n[key] / o[key]:.2f}" for o, n in zip(old, new))
            print(f"| {job} | {key} | {statistics.median(o[key] for o in old):,.1f} | "
                  f"{statistics.median(n[key] for n in new):,.1f} | {ratios} |")


if __name__ == "__main__":
    main()
