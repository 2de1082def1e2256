"""Alignment on the built-in task set (issue 13): held-out exact match of an SFT run, of SFT + DPO
on on-policy preference pairs and of SFT + GRPO on the task set, over several seeds, with the
training time, the KL to the reference at the end and the reward curves (PNG).

    python benchmarks/alignment.py [--sft runs/align-bench/sft] [--seeds 3]
    python benchmarks/alignment.py --quick                     # a smoke test, about a minute

The SFT run is `minillm finetune --run runs/shakespeare-bpe-base --data builtin:shakespeare-tasks
--method full` (issue 12's). Each step is its own process, as users run it: `minillm eval --json`
(test split: plays never trained on), `minillm prefs` once (chosen = the answer, rejected = the
SFT model's own wrong sample), then `minillm align --method dpo` and `--method grpo` once per seed
(`--set seed=S`: the batch order and, for GRPO, the sampling). The settings below are the best
of a short search on this task set (BENCHMARKS.md lists what was tried: on this SFT run neither
method beat SFT by more than the seed spread); --dpo-set / --grpo-set add or override any.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

from _common import ROOT, machine, run_measured

from minillm.data import tasks
from minillm.files import atomic_write_json

TASKS = tasks.BUILTIN
# The best of the search (BENCHMARKS.md). Both methods train on the train split's examples of KINDS only
# (shuffled across the plays): the skills that carry over to the test plays, where a reply can be
# checked against the prompt; speaker and next_word are memory of the train plays. Pairs come from
# the first `limit` of those, K samples each.
KINDS = ("last_word", "uppercase")
PREFS = {"limit": 2000, "samples": 8, "temperature": 1.0}
DPO_SET = ["max_steps=150", "lr=1e-4", "beta=0.5"]
GRPO_SET = ["max_steps=150", "temperature=0.7", "reward=partial", "log_interval=1", "eval_interval=50"]
QUICK_SET = ["max_steps=3", "eval_interval=3", "log_interval=1"]  # --quick: a few steps of each


# --- running the steps ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, Path(args.work or tempfile.mkdtemp(prefix="alignment-"))
        self.work.mkdir(parents=True, exist_ok=True)
        threads = str(args.threads)
        self.env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                    "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}

    def cli(self, name: str, *argv: str) -> tuple[float, str]:
        """(wall s, stdout) of `minillm ARGV`; its log in work/NAME.log."""
        wall, _, out = run_measured([sys.executable, "-m", "minillm.cli", *argv], self.env,
                                    self.work / f"{name}.log")
        return wall, out

    def evaluate(self, name: str, run: Path) -> dict:
        a = self.args
        wall, out = self.cli(f"{name}-eval", "eval", "--run", str(run), "--tasks", TASKS, "--json",
                             "--threads", str(a.threads), *(["--limit", str(a.limit)] if a.limit else []))
        return {**json.loads(out.strip().splitlines()[-1]), "eval_s": wall}

    def train_tasks(self) -> str:
        """The task set both methods train on: the built-in train split's examples of --kinds, in an
        order shuffled once (seed 0) so that any prefix spans every train play."""
        examples = [e for e in tasks.load_tasks(TASKS, "train") if e["kind"] in self.args.kinds]
        random.Random(0).shuffle(examples)
        tasks.write_jsonl(examples, self.work / "train-tasks.jsonl")
        return str(self.work / "train-tasks.jsonl")

    def prefs(self, train_tasks: str) -> dict:
        """`minillm prefs` from the SFT model: the pairs every DPO seed trains on."""
        a, path = self.args, self.work / "prefs.jsonl"
        wall, out = self.cli("prefs", "prefs", "--run", str(a.sft), "--tasks", train_tasks, "--out",
                             str(path), "--samples", str(a.prefs_samples), "--temperature",
                             str(a.prefs_temperature), "--limit", str(a.prefs_limit), "--threads",
                             str(a.threads), "--json")
        return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall, "path": str(path)}

    def align(self, method: str, data: str, seed: int, settings: list[str]) -> dict:
        """One `minillm align` run, then its evaluation; its metrics.jsonl's train rows kept as curves and
        the KL at the end read as the mean of the last 5 logged steps (one step's batch is noisy)."""
        a, name = self.args, f"{method}-seed{seed}"
        out = self.work / name
        sets = [*settings, f"seed={seed}", f"threads={a.threads}"]
        wall, _ = self.cli(name, "align", "--run", str(a.sft), "--method", method, "--data", data,
                           "--out", str(out), "--quiet", *[x for s in sets for x in ("--set", s)])
        state = json.loads((out / "trainer_state.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("train_loss") is not None]
        result = {"dir": str(out), "seed": seed, "train_s": state["elapsed"], "train_wall_s": wall,
                  "kl": statistics.mean(r["kl"] for r in train[-5:]), "curves": train,
                  **self.evaluate(name, out)}
        print(f"{name}: exact match {result['exact_match']:.3f}, KL {result['kl']:.3f}, "
              f"{result['train_s']:.0f} s", file=sys.stderr, flush=True)
        return result

    def rows(self) -> dict:
        a = self.args
        report = {"sft": self.evaluate("sft", a.sft)}
        print(f"SFT: exact match {report['sft']['exact_match']:.3f}", file=sys.stderr, flush=True)
        train_tasks = self.train_tasks()
        report["prefs"] = self.prefs(train_tasks)
        report["dpo"] = [self.align("dpo", report["prefs"]["path"], s, a.dpo_set) for s in range(a.seeds)]
        report["grpo"] = [self.align("grpo", train_tasks, s, a.grpo_set) for s in range(a.seeds)]
        return report


# --- the report -----------------------------------------------------------------------------------------
def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, population std, max - min) of per-seed figures."""
    return statistics.mean(values), statistics.pstdev(values), max(values) - min(values)


def table(report: dict) -> str:
    """Markdown: exact match overall and per kind, KL at the end, training and evaluation seconds."""
    head = ["", "exact match", *tasks.KINDS, "KL at end", "training s (clock / process)", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    labelled = [("SFT", report["sft"])] + [(f"{m.upper()} seed {r['seed']}", r)
                                          for m in ("dpo", "grpo") for r in report[m]]
    for label, r in labelled:
        kinds = r["by_kind"]
        cells = [label, f"{100 * r['exact_match']:.1f}% ({r['correct']}/{r['total']})",
                 *(f"{100 * kinds[k]['exact_match']:.1f}%" if k in kinds else "-" for k in tasks.KINDS),
                 f"{r['kl']:.3f}" if "kl" in r else "-",
                 f"{r['train_s']:.0f} / {r['train_wall_s']:.0f}" if "train_s" in r else "-",
                 f"{r['eval_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(report: dict) -> list[str]:
    """Per method: mean and spread over seeds, the gain over SFT against the spread."""
    sft = 100 * report["sft"]["exact_match"]
    p = report["prefs"]
    out = [f"SFT {sft:.1f}%; prefs: {p['pairs']} pairs from {p['prompts']} prompts ({p['no_wrong']} with no "
           f"wrong sample, {p['all_wrong']} with no correct one), {p['wall_s']:.0f} s"]
    for method in ("dpo", "grpo"):
        runs = report[method]
        mean, std, width = spread([100 * r["exact_match"] for r in runs])
        kl = statistics.mean(r["kl"] for r in runs)
        verdict = "above" if mean - sft > width else "NOT above"
        out.append(f"{method.upper()}: {mean:.1f}% mean over {len(runs)} seeds (std {std:.1f}, max - min "
                   f"{width:.1f} points); gain over SFT {mean - sft:+.1f} points, {verdict} the seed spread; "
                   f"worst seed {min(100 * r['exact_match'] for r in runs) - sft:+.1f}; final KL {kl:.3f}")
    return out


def plot(report: dict, png: Path) -> None:
    """Reward curves, one line per seed: GRPO mean reward, DPO reward accuracy and reward margins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("grpo", "reward", "GRPO: mean reward of the sampled groups", 10),
              ("dpo", "rewards/accuracy", "DPO: reward accuracy (chosen > rejected)", 1),
              ("dpo", "rewards/margins", "DPO: reward margin (beta x log-ratio gap)", 1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (method, key, title, window) in zip(axes, panels):
        for r in report[method]:
            steps, values = zip(*[(row["step"], row[key]) for row in r["curves"] if key in row])
            # GRPO logs every step, each from one batch of groups: a running mean shows the trend
            smooth = [statistics.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, linewidth=1, label=f"seed {r['seed']}")
        ax.set_title(title + (f" ({window}-step running mean)" if window > 1 else ""), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")  # written whole, then renamed (as viz/metrics does)
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", type=Path, default=ROOT / "runs/align-bench/sft", help="the SFT run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of each method (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    ap.add_argument("--kinds", type=lambda s: tuple(s.split(",")), default=KINDS,
                    help=f"train examples of these kinds only (default {','.join(KINDS)}; all: "
                         f"{','.join(tasks.KINDS)})")
    ap.add_argument("--prefs-limit", type=int, default=PREFS["limit"], help="train examples sampled")
    ap.add_argument("--prefs-samples", type=int, default=PREFS["samples"], help="samples per prompt")
    ap.add_argument("--prefs-temperature", type=float, default=PREFS["temperature"])
    ap.add_argument("--dpo-set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a DPO setting added to the defaults {DPO_SET} (a later one wins)")
    ap.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a GRPO setting added to the defaults {GRPO_SET} (a later one wins)")
    ap.add_argument("--limit", type=int,
                    help="score only the first N test examples (--quick: 120, every kind)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 2 seeds, 3 steps, 40 prompts for pairs, 120 test examples")
    ap.add_argument("--work", type=Path, help="where runs and logs go (default: a new temporary directory)")
    ap.add_argument("--figure", type=Path, default=ROOT / "benchmarks/figures/alignment_rewards.png",
                    help="the reward curves PNG")
    ap.add_argument("--out", type=Path, metavar="FILE.json", help="write every figure here")
    args = ap.parse_args(argv)
    args.sft = args.sft.resolve()
    if not (args.sft / "config.json").is_file():
        ap.error(f"--sft {args.sft}: not a run directory (no config.json)")
    if min(args.seeds, args.threads, args.prefs_limit, args.prefs_samples) < 1:
        ap.error("--seeds, --threads, --prefs-limit and --prefs-samples must be positive")
    args.dpo_set, args.grpo_set = DPO_SET + args.dpo_set, GRPO_SET + args.grpo_set
    if args.quick:
        args.seeds, args.prefs_limit, args.limit = min(args.seeds, 2), 40, args.limit or 120
        args.dpo_set += QUICK_SET + ["val_every=4"]  # 40 prompts leave few pairs to hold out from
        args.grpo_set += QUICK_SET + ["batch_size=4", "group_size=4", "eval_batches=1"]
    return args


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    print(f"runs and logs in {bench.work}", file=sys.stderr, flush=True)
    report = {"command": "python benchmarks/alignment.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              **bench.rows()}
    if args.out:  # first: the figures survive a failing plot
        atomic_write_json(args.out, report)
    print(f"\n    {report['command']}\n\nmachine: {report['machine']}; threads {args.threads}\n"
          f"DPO: {' '.join(args.dpo_set)}; GRPO: {' '.join(args.grpo_set)}\n\n{table(report)}\n")
    print("\n".join(f"- {line}" for line in findings(report)))
    plot(report, args.figure)
    print(f"\nreward curves: {args.figure}")


if __name__ == "__main__":
    main()
