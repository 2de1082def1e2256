"""Fine-tuning on the built-in task set: exact-match accuracy on its test split (plays never
fine-tuned on), trainable parameters, peak memory and time of the majority answer, the base model
with a 3-shot prompt, full SFT, LoRA at --ranks (alpha = 2 x rank), and the anchor: peft +
transformers training the same LoRA on the same batches.

    python benchmarks/finetune_tasks.py [--base runs/shakespeare-bpe-base] [--steps 300] [--rounds 3]
    python benchmarks/finetune_tasks.py --base /tmp/small-base --quick      # a smoke test

Each training and evaluation is its own process (`minillm finetune` / `minillm eval` as users run
them; --peft-worker for the anchor): peak memory is its maximum RSS. The rows run in --dtype on the
same threads. Training time excludes setup, evaluation and checkpoints (ours: the loop's clock,
trainer_state.json `elapsed`; the anchor: Trainer's `train_runtime`). Speed, ours / peft: ms per
step of fresh --timing-steps runs in each of --timing-dtypes (bfloat16: CPU autocast on both sides),
median over --rounds pairs, alternating which goes first.

The anchor: the base's interop.hf.to_transformers export, peft's get_peft_model (same targets,
rank, alpha, dropout), transformers' `Trainer` (trl's SFTTrainer subclasses it to tokenize) with our
AdamW settings, batch, steps, warm-up and cosine to min_lr (its warm-up starts at 0, ours at
lr / (warmup + 1)), fed our batches step for step, so both first-step losses must agree. Its
adapter is scored by `minillm eval --adapter` (interop.peft.load_peft).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import ROOT, machine, run_measured

from minillm.checkpoint import load_tensors
from minillm.data import tasks  # framework-free: the task set, its majority baseline and kinds
from minillm.files import atomic_write_json

TASKS, PEFT_LOG = tasks.BUILTIN, "peft_timing.json"  # the task set; the anchor's figures in its run


def n_values(path: Path) -> int:
    """Number of values in a safetensors file: the trained parameters a run saved."""
    return sum(int(v.size) for v in load_tensors(path).values())


def overrides(args: argparse.Namespace, rank: int | None = None) -> list[str]:
    """The --set pairs of one of our runs (LoRA when rank is given); the anchor reads the same list."""
    lora = [f"lora_rank={rank}", f"lora_alpha={2 * rank}"] if rank else []
    return [*lora, f"max_steps={args.steps}", f'dtype="{args.dtype}"', f"threads={args.threads}"]


# --- the rows -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, Path(args.work or tempfile.mkdtemp(prefix="finetune_tasks-"))
        self.work.mkdir(parents=True, exist_ok=True)
        threads = str(args.threads)
        self.env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                    "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def evaluate(self, name: str, run: Path, adapter: str | None = None, few_shot: int = 0) -> dict:
        a = self.args
        cmd = [sys.executable, "-m", "minillm.cli", "eval", "--run", str(run), "--tasks", TASKS, "--json",
               "--threads", str(a.threads), *(["--adapter", adapter] if adapter else []),
               *(["--few-shot", str(few_shot)] if few_shot else []),
               *(["--limit", str(a.limit)] if a.limit else [])]
        wall, rss, out = run_measured(cmd, self.env, self.work / f"{name}-eval.log")
        return {**json.loads(out.strip().splitlines()[-1]), "eval_s": wall, "eval_rss_mib": rss}

    def train_ours(self, name: str, rank: int | None = None, args: argparse.Namespace | None = None) -> dict:
        """`minillm finetune`: full SFT, or LoRA of this rank; `args` (steps, dtype) default to the rows'."""
        out, args = self.work / name, args or self.args
        cmd = [sys.executable, "-m", "minillm.cli", "finetune", "--run", str(args.base), "--data", TASKS,
               "--method", "lora" if rank else "full", "--out", str(out), "--quiet",
               *[a for s in overrides(args, rank) for a in ("--set", s)]]
        wall, rss, _ = run_measured(cmd, self.env, self.work / f"{name}-train.log")
        state = json.loads((out / "trainer_state.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = next(r["train_loss"] for r in rows if r.get("train_loss") is not None)  # step 0's batch
        return {"dir": str(out), "train_s": state["elapsed"], "train_wall_s": wall, "train_rss_mib": rss,
                "trainable": n_values(out / ("adapter.safetensors" if rank else "model.safetensors")),
                "first_loss": first}

    def train_peft(self, name: str, a: argparse.Namespace | None = None) -> dict:
        out, a = self.work / name, a or self.args
        cmd = [sys.executable, __file__, "--peft-worker", str(out), "--base", str(a.base), "--dtype", a.dtype,
               "--steps", str(a.steps), "--ranks", str(a.ranks[0]), "--threads", str(a.threads)]
        wall, rss, _ = run_measured(cmd, self.env, self.work / f"{name}-train.log")
        return {"dir": str(out), **json.loads((out / PEFT_LOG).read_text()), "train_wall_s": wall,
                "train_rss_mib": rss, "trainable": n_values(out / "adapter_model.safetensors")}

    def rows(self) -> dict[str, dict]:
        """Every row in order, each trained then scored; progress on stderr."""
        a = self.args
        test = tasks.load_tasks(TASKS, "test")[: a.limit]
        rows = {"majority answer": tasks.majority_baseline(tasks.load_tasks(TASKS, "train"), test),
                "base, 3-shot": self.evaluate("base-3shot", a.base, few_shot=3)}
        jobs = {"full SFT": self.train_ours,
                **{f"LoRA r{r}": lambda name, r=r: self.train_ours(name, r) for r in a.ranks},
                f"peft LoRA r{a.ranks[0]}": self.train_peft}
        for label, train in jobs.items():
            name = label.replace(" ", "-")
            trained = train(name)
            run, adapter = (a.base, trained["dir"]) if label.startswith("peft") else (trained["dir"], None)
            rows[label] = {**trained, **self.evaluate(name, run, adapter)}
            print(f"{label}: exact match {rows[label]['exact_match']:.3f}, "
                  f"training {trained['train_s']:.1f} s", file=sys.stderr, flush=True)
        return rows

    def timing_rounds(self) -> dict[str, dict]:
        """Per dtype: ms per step of our LoRA and peft's at the anchor rank over --timing-steps steps,
        round after round, alternating which goes first so that a drifting machine slows both alike."""
        out, r = {}, self.args.ranks[0]
        for dtype in self.args.timing_dtypes:
            a = argparse.Namespace(**{**vars(self.args), "steps": self.args.timing_steps, "dtype": dtype})
            ms: dict[str, list[float]] = {}
            for i in range(self.args.rounds):
                for side in ("ours", "peft") if i % 2 == 0 else ("peft", "ours"):
                    train = self.train_ours(f"{dtype}-{i}-{side}", r, a) if side == "ours" else \
                        self.train_peft(f"{dtype}-{i}-{side}", a)
                    ms.setdefault(side, []).append(1000 * train["train_s"] / a.steps)
                print(f"{dtype} round {i}: ms/step ours {ms['ours'][-1]:.1f}, peft {ms['peft'][-1]:.1f}",
                      file=sys.stderr, flush=True)
            ratios = [o / t for o, t in zip(ms["ours"], ms["peft"])]
            out[dtype] = {"ours_ms": ms["ours"], "peft_ms": ms["peft"], "ratios": ratios,
                          "ratio_median": statistics.median(ratios)}
        return out


# --- the anchor: peft + transformers' Trainer (a subprocess: python finetune_tasks.py --peft-worker DIR) -
def anchor_batches(cfg, ft) -> list[dict]:
    """Our training batches of steps 0 .. max_steps - 1 as Trainer rows, in order: x as input_ids, our
    targets y (-100 where untrained) as shift_labels (HF's loss then shifts nothing) and labels
    (which only tell the model to compute a loss). Rows of one batch share its width."""
    import torch

    from minillm.tokenizer import load_tokenizer
    from minillm.torch.sft import SFTData

    data, rows = SFTData(cfg, ft, load_tokenizer(ft.base_run)), []
    for step in range(cfg.max_steps):
        x, y = (torch.from_numpy(a) for a in data.train.batch(step))  # (B, W) each: our trainer's `step`
        rows += [{"input_ids": x[i], "labels": y[i], "shift_labels": y[i]} for i in range(len(x))]
    return rows


def peft_worker(args: argparse.Namespace) -> None:
    """Train the anchor LoRA; save it in peft's format to args.peft_worker, with its PEFT_LOG."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from minillm.finetune import finetune_configs
    from minillm.interop.hf import to_transformers
    from minillm.interop.peft import TARGET_MODULES
    from minillm.torch.model import load_model

    out = Path(args.peft_worker)
    cfg, ft = finetune_configs(str(args.base), TASKS, str(out), "lora", overrides(args, args.ranks[0]))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # A's random start, as our trainer seeds before making the model
    model = get_peft_model(to_transformers(load_model(args.base)[0]).float().train(), LoraConfig(
        r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout, bias="none",
        target_modules=[TARGET_MODULES[t] for t in ft.targets], task_type="CAUSAL_LM"))
    hf_args = TrainingArguments(  # our run's optimizer, schedule, batch and steps
        output_dir=str(out / "trainer"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="cosine_with_min_lr", warmup_steps=cfg.warmup_steps,
        lr_scheduler_kwargs={"min_lr": cfg.min_lr}, weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2, adam_epsilon=cfg.eps, max_grad_norm=cfg.grad_clip, optim="adamw_torch_fused",
        seed=cfg.seed, logging_steps=cfg.log_interval, logging_first_step=True, save_strategy="no",
        report_to="none", use_cpu=True, remove_unused_columns=False, train_sampling_strategy="sequential",
        disable_tqdm=True, bf16=cfg.dtype == "bfloat16")  # bf16: torch.autocast on the CPU, as ours
    trainer = Trainer(model=model, args=hf_args, train_dataset=anchor_batches(cfg, ft))
    seconds = trainer.train().metrics["train_runtime"]  # its training loop, after setup, before saving
    model.save_pretrained(str(out))
    first = next(log["loss"] for log in trainer.state.log_history if "loss" in log)  # logging_first_step
    (out / PEFT_LOG).write_text(json.dumps({"train_s": seconds, "first_loss": first}))


# --- the report ---------------------------------------------------------------------------------------
def import_rss(bench: Bench) -> dict[str, float]:
    """Peak RSS (MiB) of processes that only import each side's libraries: the floor under its figures."""
    codes = {"torch + minillm": "import torch, minillm.torch.sft",
             "torch + transformers + peft": "import torch, transformers, peft, minillm.torch.sft"}
    return {name: run_measured([sys.executable, "-c", code], bench.env, bench.work / "imports.log")[1]
            for name, code in codes.items()}


def table(rows: dict[str, dict]) -> str:
    """Markdown: accuracy overall and per kind, trainable parameters (share of full SFT's), the training
    process's peak RSS, training seconds (the training clock / the whole process), evaluation seconds."""
    full = rows["full SFT"]["trainable"]
    head = ["", "exact match", *tasks.KINDS, "trainable params (of full)", "training peak RSS (MiB)",
            "training s (clock / process)", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, r in rows.items():
        trained = "train_s" in r
        kinds = r["by_kind"]
        cells = [label, f"{100 * r['exact_match']:.1f}% ({r['correct']}/{r['total']})",
                 *(f"{100 * kinds[k]['exact_match']:.1f}%" if k in kinds else "-" for k in tasks.KINDS),
                 f"{r['trainable']:,} ({100 * r['trainable'] / full:.2f}%)" if trained else "-",
                 f"{r['train_rss_mib']:,.0f}" if trained else "-",
                 f"{r['train_s']:.1f} / {r['train_wall_s']:.1f}" if trained else "-",
                 f"{r['eval_s']:.1f}" if "eval_s" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(report: dict) -> list[str]:
    """The issue's goals, each with its figure."""
    rows, r0 = report["rows"], report["settings"]["ranks"][0]
    em = {label: 100 * r["exact_match"] for label, r in rows.items()}  # percent
    full, ours, peft = rows["full SFT"], rows[f"LoRA r{r0}"], rows[f"peft LoRA r{r0}"]
    out = [f"full SFT {em['full SFT']:.1f}% vs base 3-shot {em['base, 3-shot']:.1f}% "
           f"(majority answer {em['majority answer']:.1f}%)"]
    out += [f"LoRA r{r}: {em[f'LoRA r{r}'] - em['full SFT']:+.1f} points from full SFT (goal: within 5) with "
            f"{100 * rows[f'LoRA r{r}']['trainable'] / full['trainable']:.2f}% of its trainable parameters "
            f"(goal: <= 5%)" for r in report["settings"]["ranks"]]
    med = statistics.median
    out += [f"time per step ours / peft + transformers, LoRA r{r0}, {dtype}: {t['ratio_median']:.2f}x, median"
            f" of {len(t['ratios'])} round(s) ({', '.join(f'{x:.2f}x' for x in t['ratios'])}; ours "
            f"{med(t['ours_ms']):.1f} ms, peft {med(t['peft_ms']):.1f} ms; goal <= 0.7x)"
            for dtype, t in report["timing"].items()]
    out.append(f"accuracy ours {100 * ours['exact_match']:.1f}% vs peft {100 * peft['exact_match']:.1f}%; "
               f"first-step loss (same batch, adapters start at zero: must agree) ours "
               f"{ours['first_loss']:.4f}, peft {peft['first_loss']:.4f}")
    floors = ", ".join(f"{k} {v:,.0f} MiB" for k, v in report["import_rss_mib"].items())
    return out + [f"peak RSS of a process that only imports: {floors}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=ROOT / "runs/shakespeare-bpe-base", help="the base run")
    ap.add_argument("--steps", type=int, help="optimizer steps of every fine-tuning (default 300; --quick 3)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of the rows' runs")
    ap.add_argument("--rounds", type=int, help="timing rounds of ours vs peft, median (default 3; --quick 1)")
    ap.add_argument("--timing-steps", type=int, help="steps of each timed run (default 300; --quick 3)")
    ap.add_argument("--timing-dtypes", nargs="+", default=["float32", "bfloat16"], help="(bf16: autocast)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32],
                    help="LoRA ranks, alpha = 2 x rank; peft trains the first too (default 8 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (all CPUs)")
    ap.add_argument("--limit", type=int, help="score only the first N test examples (--quick: 16)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 3 steps, 16 test examples, 1 round")
    ap.add_argument("--work", type=Path, help="where runs and logs go (default: a new temporary directory)")
    ap.add_argument("--out", type=Path, metavar="FILE.json", help="write every figure here")
    ap.add_argument("--peft-worker", metavar="DIR", help=argparse.SUPPRESS)  # one anchor training
    args = ap.parse_args(argv)
    args.base, quick = args.base.resolve(), args.quick  # the runs record the base's path
    args.steps = args.steps or (3 if quick else 300)
    args.rounds = args.rounds or (1 if quick else 3)
    args.timing_steps = args.timing_steps or (3 if quick else 300)
    args.limit = args.limit or (16 if quick else None)
    if not (args.base / "model.safetensors").is_file():
        ap.error(f"--base {args.base}: not a trained run directory (no model.safetensors)")
    if min(args.steps, args.rounds, args.timing_steps, args.threads, *args.ranks) < 1:
        ap.error("--steps, --rounds, --timing-steps, --threads and --ranks must be positive")
    return args


def main() -> None:
    args = parse_args()
    if args.peft_worker:
        return peft_worker(args)
    bench = Bench(args)
    print(f"runs and logs in {bench.work}", file=sys.stderr, flush=True)
    rows = bench.rows()
    command = "python benchmarks/finetune_tasks.py " + " ".join(sys.argv[1:])
    report = {"command": command, "machine": machine(("torch", "transformers", "peft")),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows, "timing": bench.timing_rounds(), "import_rss_mib": import_rss(bench)}
    print(f"\n    {report['command']}\n\nmachine: {report['machine']}; threads {args.threads}, {args.dtype}, "
          f"{args.steps} steps\n\n{table(rows)}\n")
    print("\n".join(f"- {line}" for line in findings(report)))
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
