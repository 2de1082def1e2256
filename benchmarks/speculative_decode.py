"""Speculative decoding against the plain compiled decode of the same target, side by side (issue 19:
"with a draft model, >= 1.5x the plain compiled decode at identical greedy output").

    python benchmarks/speculative_decode.py             # trains the pair when missing, then times it
    python benchmarks/speculative_decode.py --quick     # a smoke test (a minute or two, in a temporary dir)

1. The pair, on one tokenizer (data/shakespeare-bpe's 1,024-token BPE). Target: --target, or
   runs/speculative-target, trained there from configs/speculative-target.toml (43M parameters,
   172 MB of fp32 weights: its decode step streams them from memory) for --target-seconds when it is
   missing. Drafts: "base", --base as it was trained (runs/shakespeare-bpe-base, 1.0M), and
   "distilled", --draft: runs/speculative-draft, that base distilled from the target when missing
   (`minillm distill --init`, alpha 1, T 1, configs/speculative-draft.toml) for --draft-seconds.
2. Speed: greedy (temperature 0), batch 1, fp32, compile=True unless said, --new-tokens after each
   of --prompts prompts of --prompt-len tokens from the held-out split. Variants: the plain decode
   of the target (minillm.torch.generate; its eager decode too, for reference: on some CPUs it is
   the faster), each draft alone, and speculative_generate with each draft for each K of --ks.
   Each round runs every variant once, in turn (a busy machine slows them alike); tokens/s = new
   tokens / wall time of the calls (prefill included), median of --rounds after a warm-up that
   also compiles. The greedy tokens of every variant are compared with the plain compiled
   decode's, and the rounds are counted by drafts accepted.
3. Costs, to explain the ratio: ms per call of each model's compiled decode step and of the
   target's compiled verify pass over K + 1 tokens (and of the eager pass it replaced), and the
   ratio they predict, tokens per round * target step / (K * draft step + verify pass); the
   measured ratio differs from it by the per-round Python work (sampling, bookkeeping, the draft's
   catch-up steps) and by what a whole plain decode costs beyond its compiled step (it can beat it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, alternate, machine

from minillm.cli import main as cli
from minillm.data.loader import read_tokens
from minillm.torch.generate import generate
from minillm.torch.sft import load_for_inference
from minillm.torch.speculative import CachedDecoder, speculative_generate

QUICK_TARGET = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
                "model.d_ff=256"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="runs/speculative-target",
                   help="the target run (trained when missing)")
    p.add_argument("--draft", default="runs/speculative-draft",
                   help="the distilled draft run (distilled from the target when missing)")
    p.add_argument("--base", default="runs/shakespeare-bpe-base", help="the undistilled draft")
    p.add_argument("--data", default="data/shakespeare-bpe")
    p.add_argument("--target-seconds", type=float, default=420.0)
    p.add_argument("--draft-seconds", type=float, default=150.0)
    p.add_argument("--ks", default="2,3,4,6", help="draft tokens per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--cost-calls", type=int, default=30, help="calls per cost measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: a tiny target (10 s), 5 s of distillation, K 2, 1 round, 24 tokens")
    args = p.parse_args()
    if args.quick:  # the pair in a temporary directory, never the real runs
        work = Path(tempfile.mkdtemp(prefix="speculative-"))
        args.target, args.draft = str(work / "target"), str(work / "draft")
        args.target_seconds, args.draft_seconds, args.ks, args.rounds = 10.0, 5.0, "2", 1
        args.prompts, args.new_tokens, args.cost_calls = 1, 24, 3
    return args


# --- 1. the pair --------------------------------------------------------------------------------------
def train_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    """(target run, distilled draft run), each trained first when its directory has no model."""
    target = Path(args.target)
    if not (target / "model.safetensors").is_file():
        argv = ["train", "--config", str(ROOT / "configs/speculative-target.toml"), "--quiet",
                "--set", f"out_dir={target}", "--set", f"data_dir={args.data}",
                "--set", f"max_time={args.target_seconds}", "--set", f"threads={args.threads}"]
        for item in QUICK_TARGET if args.quick else []:
            argv += ["--set", item]
        run_cli(argv)
    draft = Path(args.draft)
    if not (draft / "model.safetensors").is_file():
        run_cli(["distill", "--teacher", str(target), "--init", args.base, "--quiet",
                 "--config", str(ROOT / "configs/speculative-draft.toml"), "--set", f"out_dir={draft}",
                 "--set", f"data_dir={args.data}", "--set", f"max_time={args.draft_seconds}",
                 "--set", f"threads={args.threads}", "--set", "alpha=1", "--set", "temperature=1"])
    return target, draft


def run_cli(argv: list[str]) -> None:
    t = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"failed: minillm {' '.join(argv)}")
    print(f"minillm {argv[0]}: {time.perf_counter() - t:.0f} s", flush=True)


def val_loss(run: Path) -> float | None:
    """The run's last evaluated val loss (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None)
    return None if loss is None else round(loss, 3)


def held_out_prompts(args: argparse.Namespace) -> list[list[int]]:
    """--prompts windows of --prompt-len tokens, spread evenly over the val split."""
    val = read_tokens(Path(args.data) / "val.bin")
    starts = np.linspace(0, len(val) - args.prompt_len - 1, args.prompts + 2).astype(int)[1:-1]
    return [val[s:s + args.prompt_len].astype(np.int64).tolist() for s in starts]


# --- 2. speed -----------------------------------------------------------------------------------------
class Variant:
    """One way to decode every prompt; calling it returns tokens/s and keeps the last outputs."""

    def __init__(self, decode, prompts: list[list[int]], new_tokens: int):
        self.decode, self.prompts, self.new_tokens = decode, prompts, new_tokens
        self.outputs: list[list[int]] = []
        self.accept_counts: list[int] | None = None

    def __call__(self, _steps: int = 1) -> float:
        t = time.perf_counter()
        results = [self.decode(p) for p in self.prompts]
        seconds = time.perf_counter() - t
        if results and hasattr(results[0], "accept_counts"):  # SpeculativeOutput
            self.accept_counts = [sum(c) for c in zip(*(r.accept_counts for r in results))]
            results = [r.tokens for r in results]
        self.outputs = results
        return sum(len(r) for r in results) / seconds


def variants(target, drafts: dict, prompts: list[list[int]], ks: list[int], n: int) -> dict[str, Variant]:
    """The plain decode of the target (compiled, and eager for reference), each draft alone (compiled),
    speculative decoding with each draft and K."""
    def plain(model, compile: bool = True):
        return Variant(lambda p: generate(model, p, n, temperature=0, compile=compile), prompts, n)

    def speculative(draft, k: int):
        return Variant(lambda p: speculative_generate(target, draft, p, n, k=k, temperature=0, compile=True),
                       prompts, n)

    runs = {"target (plain)": plain(target), "target (plain, eager)": plain(target, compile=False)}
    runs.update({f"{name} draft alone": plain(draft) for name, draft in drafts.items()})
    runs.update({f"speculative, {name} draft, K={k}": speculative(draft, k)
                 for name, draft in drafts.items() for k in ks})
    return runs


# --- 3. costs -----------------------------------------------------------------------------------------
@torch.inference_mode()
def cost_ms(model, prompt: list[int], window: int, tokens: int, calls: int, compiled: bool = True) -> float:
    """ms per call of the compiled decode step (tokens 1) or verify pass (tokens > 1) after `prompt`;
    compiled=False: the verify pass as it ran before it was compiled (eager, on the same weights)."""
    decoder = CachedDecoder(model, window, compile=True, verify_length=tokens)
    decoder.prefill(prompt)
    feed = prompt[-tokens:] if tokens > 1 else prompt[-1:]
    times = []
    for _ in range(calls + 2):  # two warm-up calls (the first compiles)
        t = time.perf_counter()
        decoder.forward(feed) if compiled else decoder.prefill(feed)
        times.append(time.perf_counter() - t)
        decoder.rollback(len(prompt))
    return 1000 * statistics.median(times[2:])


def costs(target, drafts: dict, prompt: list[int], window: int, ks: list[int], calls: int) -> dict:
    out = {"target step": cost_ms(target, prompt, window, 1, calls)}
    out.update({f"target verify {k + 1}": cost_ms(target, prompt, window, k + 1, calls) for k in ks})
    out.update({f"target verify {k + 1} eager": cost_ms(target, prompt, window, k + 1, calls, False)
                for k in ks})
    out.update({f"{name} step": cost_ms(d, prompt, window, 1, calls) for name, d in drafts.items()})
    return {k: round(v, 3) for k, v in out.items()}


# --- the report ---------------------------------------------------------------------------------------
def summarise(runs: dict[str, Variant], speeds: dict[str, list[float]], cost: dict) -> list[dict]:
    """One row per variant: median tokens/s, ratio to the plain decode, spread, identical tokens;
    speculative rows add drafts accepted per round, acceptance and the cost model's ratio."""
    plain = statistics.median(speeds["target (plain)"])
    rows = []
    for name, v in runs.items():
        tps = statistics.median(speeds[name])
        row = dict(variant=name, tokens_per_s=round(tps, 1), ratio=round(tps / plain, 3),
                   spread=round((max(speeds[name]) - min(speeds[name])) / tps, 3),
                   same_tokens=None if "alone" in name or "eager" in name else
                   v.outputs == runs["target (plain)"].outputs)
        if v.accept_counts is not None:
            k = len(v.accept_counts) - 1
            rounds = sum(v.accept_counts)
            accepted = sum(i * c for i, c in enumerate(v.accept_counts)) / rounds
            draft_step = cost[f"{name.split(', ')[1].split()[0]} step"]
            round_ms = k * draft_step + cost[f"target verify {k + 1}"]
            predicted = (accepted + 1) * cost["target step"] / round_ms
            row.update(accepted_per_round=round(accepted, 3), acceptance=round(accepted / k, 3),
                       accept_counts=v.accept_counts, cost_model_ratio=round(predicted, 3))
        rows.append(row)
    return rows


def report(args: argparse.Namespace, rows: list[dict], cost: dict, info: dict) -> None:
    print(f"\n    {info['command']}\n\n{info['machine']}")
    print(f"target {info['target']} ({info['target_params'] / 1e6:.1f}M, val {info['target_val_loss']}); "
          f"drafts: base {args.base} (val {info['base_val_loss']}), distilled {info['draft']} "
          f"(val {info['draft_val_loss']}); greedy, batch 1, fp32, compiled, {args.prompts} held-out prompts "
          f"of {args.prompt_len} tokens, {args.new_tokens} new tokens each, median of {args.rounds} rounds\n")
    print("| variant | tok/s | x plain | drafts accepted / round | acceptance | cost-model x | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        extra = ["-", "-", "-"]
        if "acceptance" in r:
            extra = [f"{r['accepted_per_round']:.2f}", f"{100 * r['acceptance']:.0f}%",
                     f"{r['cost_model_ratio']:.2f}"]
        print(f"| {r['variant']} | {r['tokens_per_s']:,.1f} | {r['ratio']:.2f} | {' | '.join(extra)} "
              f"| {'-' if r['same_tokens'] is None else 'yes' if r['same_tokens'] else 'NO'} |")
    print("\ncosts (ms per call, compiled): " + ", ".join(f"{k} {v:.2f}" for k, v in cost.items()))
    print("\n" + json.dumps(dict(**info, rows=rows, costs=cost)))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # the graphs of the target, two drafts and every K
    target_dir, draft_dir = train_pair(args)
    target, tokenizer = load_for_inference(str(target_dir))
    drafts = {"base": load_for_inference(args.base)[0], "distilled": load_for_inference(str(draft_dir))[0]}
    ks, prompts = [int(k) for k in args.ks.split(",")], held_out_prompts(args)
    runs = variants(target, drafts, prompts, ks, args.new_tokens)
    t = time.perf_counter()
    speeds = alternate(runs, args.rounds, 1, 1)
    print(f"timing (warm-up and compilation included): {time.perf_counter() - t:.0f} s", flush=True)
    cost = costs(target, drafts, prompts[0], args.prompt_len + args.new_tokens, ks, args.cost_calls)
    rows = summarise(runs, speeds, cost)
    info = dict(command=" ".join(["python benchmarks/speculative_decode.py", *sys.argv[1:]]),
                machine=machine(), target=str(target_dir), target_params=target.num_parameters(),
                target_val_loss=val_loss(target_dir), base_val_loss=val_loss(Path(args.base)),
                draft=str(draft_dir), draft_val_loss=val_loss(draft_dir),
                sample=tokenizer.decode(prompts[0] + runs["target (plain)"].outputs[0]))
    report(args, rows, cost, info)


if __name__ == "__main__":
    main()
