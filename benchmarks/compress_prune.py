"""Pruning and distillation on a model trained here: perplexity against sparsity for each pruning
method before and after a short recovery, the speed-up of structured pruning, and a distilled
student against the same student trained without its teacher for the same time.

    python benchmarks/compress_prune.py [--base runs/shakespeare-bpe-base] [--data data/shakespeare-bpe]
    python benchmarks/compress_prune.py --quick          # a smoke test (minutes)

1. Perplexity on --eval-batches fixed windows of the held-out split, for magnitude (per layer and
   global), 2:4 (50% only), heads and channels (Wanda-scored on --calibration-batches of the train
   split) at each --sparsities value the method can reach (heads of a GQA model come in steps of
   n_kv_heads / n_heads). Recovery: --recovery-steps of `minillm distill --init PRUNED` with the
   unpruned model as teacher (alpha --recovery-alpha, T = 2) on the pretraining shards; pruned zeros
   stay zero. Plot: --out-dir/compress_prune.png.
2. Speed of the structurally pruned models at 25% and 50% against the dense one: forward tokens/s
   (batch 8 x 256, no grad) and greedy decode tokens/s at batch 1 (minillm.torch.generate, eager or
   with --compile), medians of --rounds alternating rounds on --threads threads; the same for random
   models of the --speed-presets shapes (gpt2-small) pruned by weight norms.
3. Distillation: the --student shape trained for the same --distill-seconds of training each, over
   --seeds, one kind after the other per seed (--distill-kinds): "alone" by `minillm train`;
   "cached" by `minillm distill --teacher-cache` (teacher = the base, --distill-alpha,
   --distill-temperature, its top --distill-top-k log-probs per position cached once before the
   timed runs, the build timed on its own); "live" by `minillm distill` with the teacher's forward
   on every batch (its cost counts: the student takes fewer steps). The final val loss (CE on the
   val split) of each, and whether a distilled kind beats "alone" by more than the seed spread.
   `--distill-only` runs this part alone; `--reuse` reads the result of a student run already in
   --work instead of training it again (to split the seeds over several invocations).
   --distill-budget time stops each run at --distill-seconds of wall clock (`max_time`), which on a
   machine shared with other jobs gives each kind whatever the others leave it. --distill-budget
   steps (the default) instead measures each kind's seconds per optimizer step first, in
   alternating rounds within one process (a busy machine slows them alike; medians), saves them
   in --work, and trains each kind for the steps it takes in --distill-seconds at that rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, alternate, machine

from minillm.checkpoint import load_run, save_run
from minillm.cli import main as cli
from minillm.config import ModelConfig, load_train_config
from minillm.data.loader import BatchLoader, eval_batches, read_tokens
from minillm.torch import prune, teacher_cache
from minillm.torch.distill import DistillConfig, DistillTrainer
from minillm.torch.generate import generate
from minillm.torch.model import Transformer, model_from_params, model_params, next_token_loss
from minillm.torch.sft import load_for_inference
from minillm.torch.train import Trainer

KINDS = ("alone", "cached", "live")  # part 3: the student without a teacher, from a cache, on the fly
METHODS = {"magnitude-layer": ("magnitude", "layer"), "magnitude-global": ("magnitude", "global"),
           "2:4": ("2:4", "layer"), "heads": ("heads", "layer"), "channels": ("channels", "layer")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/shakespeare-bpe-base")
    p.add_argument("--data", default="data/shakespeare-bpe")
    p.add_argument("--sparsities", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    p.add_argument("--recovery-steps", type=int, default=50)
    p.add_argument("--recovery-alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="decode with the compiled row-dot step")
    p.add_argument("--speed-presets", default="gpt2-small",
                   help="also time structured pruning on random models of these preset shapes ('' = none)")
    p.add_argument("--student", default="d_model=64,n_layers=2,n_heads=2,n_kv_heads=1,d_ff=192")
    p.add_argument("--distill-seconds", type=float, default=120.0)
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--distill-top-k", type=int, default=32)
    p.add_argument("--distill-kinds", default="alone,cached", help="a subset of alone,cached,live")
    p.add_argument("--distill-only", action="store_true", help="run part 3 alone")
    p.add_argument("--distill-budget", choices=("steps", "time"), default="steps",
                   help="equal time as measured step rates (steps) or as wall clock (time); see above")
    p.add_argument("--reuse", action="store_true", help="keep the student runs already finished in --work")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", help="directory for the pruned and trained runs (default: a temporary one)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "figures"))
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 1 sparsity, 3 recovery steps, 1 round, 10 s, 1 seed")
    args = p.parse_args()
    if set(args.methods.split(",")) - set(METHODS):
        p.error(f"--methods: unknown {sorted(set(args.methods.split(',')) - set(METHODS))}")
    if set(args.distill_kinds.split(",")) - set(KINDS) or "alone" not in args.distill_kinds.split(","):
        p.error(f"--distill-kinds: 'alone' and any of {KINDS[1:]}, got {args.distill_kinds!r}")
    if args.quick:
        args.sparsities, args.eval_batches, args.calibration_batches = "0,0.5", 2, 2
        args.recovery_steps, args.rounds, args.distill_seconds, args.seeds = 3, 1, 10.0, "0"
        args.speed_presets = "gpt-char"
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, Path(args.work or tempfile.mkdtemp(prefix="compress_prune-"))
        self.work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(args.threads)
        self.config, self.tokenizer, self.params = load_run(args.base)
        self.dense = model_from_params(self.config, self.params).eval()
        val = read_tokens(Path(args.data) / "val.bin")
        self.val = [torch.from_numpy(x) for x, _ in eval_batches(val, 256, 8, args.eval_batches)]
        self.val_y = [torch.from_numpy(y) for _, y in eval_batches(val, 256, 8, args.eval_batches)]
        loader = BatchLoader(args.data, 256, 8, split="train", seed=0)
        batches = [torch.from_numpy(loader.next_batch()[0]).long() for _ in range(args.calibration_batches)]
        self.rms = prune.input_rms(self.dense, batches)

    @torch.no_grad()
    def perplexity(self, model) -> float:
        model.eval()
        losses = [next_token_loss(model(x), y).item() for x, y in zip(self.val, self.val_y)]
        return float(np.exp(np.mean(losses)))

    def pruned(self, method: str, scope: str, sparsity: float):
        return prune.prune(self.config, self.params, method, sparsity, scope,
                           self.rms if method in ("heads", "channels") else None)

    def recover(self, name: str, config, params, record) -> float:
        """Perplexity after --recovery-steps of distillation from the dense base into the pruned run."""
        init, out = self.work / f"{name}-pruned", self.work / f"{name}-recovered"
        save_run(init, config, self.tokenizer, params, {"prune": record})
        toml = self.toml(out, max_steps=self.args.recovery_steps, lr=1e-3, min_lr=1e-4, warmup_steps=5)
        argv = ["distill", "--teacher", self.args.base, "--init", str(init), "--config", str(toml), "--quiet",
                "--set", f"alpha={self.args.recovery_alpha}", "--set", "temperature=2"]
        if cli(argv) != 0:
            raise SystemExit(f"recovery failed: minillm {' '.join(argv)}")
        config, _, params = load_run(out)
        return self.perplexity(model_from_params(config, params))

    def toml(self, out: Path, model: dict | None = None, **train) -> Path:
        top = dict(data_dir=self.args.data, out_dir=str(out), batch_size=16, block_size=256, eval_interval=0,
                   eval_batches=self.args.eval_batches, dtype="float32", threads=self.args.threads, **train)
        lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
        lines += ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in (model or {}).items()]
        path = out.parent / f"{out.name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # --- 1. perplexity against sparsity ---------------------------------------------------------------
    def sweep(self) -> list[dict]:
        rows, dense = [], self.perplexity(self.dense)
        for label in self.args.methods.split(","):
            method, scope = METHODS[label]
            for s in [float(v) for v in self.args.sparsities.split(",")]:
                if s == 0 or (method == "2:4" and s != 0.5):
                    continue
                try:
                    config, params, record = self.pruned(method, scope, s)
                except ValueError as e:  # e.g. 25% of the heads of a GQA model with 2 per group
                    print(f"{label} {s}: skipped ({e})", file=sys.stderr)
                    continue
                if any(r["method"] == label and r["reached"] == round(record["reached"], 4) for r in rows):
                    continue  # heads: several asked sparsities round to the same number of heads
                before = self.perplexity(model_from_params(config, params))
                after = self.recover(f"{label.replace(':', '-')}-{s}", config, params, record)
                rows.append(dict(method=label, sparsity=s, reached=round(record["reached"], 4),
                                 ppl=round(before, 3), ppl_recovered=round(after, 3)))
                print(json.dumps(rows[-1]), file=sys.stderr)
        return [dict(method="dense", sparsity=0.0, reached=0.0, ppl=round(dense, 3), ppl_recovered=None),
                *rows]

    def plot(self, rows: list[dict], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        dense = rows[0]["ppl"]
        for i, label in enumerate(METHODS):
            mine = [r for r in rows if r["method"] == label]
            if not mine:
                continue
            x = [0.0] + [r["reached"] for r in mine]
            color = f"C{i}"
            ax.plot(x, [dense] + [r["ppl"] for r in mine], "o-", color=color, label=f"{label}")
            ax.plot(x, [dense] + [r["ppl_recovered"] for r in mine], "s--", color=color,
                    label=f"{label}, recovered")
        ax.set(xlabel="sparsity (fraction of weights / heads / channels removed)", yscale="log",
               ylabel="val perplexity", title=f"pruning {Path(self.args.base).name}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    # --- 2. speed of the smaller models ---------------------------------------------------------------
    def speed(self, preset: str | None = None) -> list[dict]:
        """The base and its heads / channels prunes, or (preset) a random model of that shape
        pruned by weight norms: only the shapes matter for speed."""
        base, params, rms = self.config, self.params, self.rms
        if preset:
            torch.manual_seed(0)
            base = ModelConfig.preset(preset, max_seq_len=512)
            params, rms = model_params(Transformer(base)), None
        models = {"dense": model_from_params(base, params).eval()}
        for method in ("heads", "channels"):
            for s in (0.25, 0.5):
                try:
                    config, small, _ = prune.prune(base, params, method, s, rms=rms)
                except ValueError as e:
                    print(f"speed {method} {s}: skipped ({e})", file=sys.stderr)
                    continue
                models[f"{method}-{s}"] = model_from_params(config, small).eval()
        x = torch.randint(0, base.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
        prompt = x[0, :16].tolist()

        @torch.no_grad()
        def forward(model, steps):
            t = time.perf_counter()
            for _ in range(steps):
                model(x)
            return steps * x.numel() / (time.perf_counter() - t)

        def decode(model, steps):
            t = time.perf_counter()
            n = len(generate(model, prompt, 64 * steps, temperature=0.0, compile=self.args.compile))
            return n / (time.perf_counter() - t)

        rounds = self.args.rounds
        fwd = alternate({n: (lambda k, m=m: forward(m, k)) for n, m in models.items()}, rounds, 2, 1)
        dec = alternate({n: (lambda k, m=m: decode(m, k)) for n, m in models.items()}, rounds, 2, 1)
        base_f, base_d = statistics.median(fwd["dense"]), statistics.median(dec["dense"])
        return [dict(model=n, forward_tok_s=round(statistics.median(fwd[n])),
                     forward_speedup=round(statistics.median(fwd[n]) / base_f, 3),
                     decode_tok_s=round(statistics.median(dec[n]), 1),
                     decode_speedup=round(statistics.median(dec[n]) / base_d, 3),
                     params=sum(p.numel() for p in m.parameters())) for n, m in models.items()]

    # --- 3. distillation against the same student alone -------------------------------------------------
    def build_cache(self) -> dict:
        """The teacher cache of the base over the train split (timed here, not in any student's time)."""
        a = self.args
        cache = self.work / f"teacher-cache-T{a.distill_temperature}-k{a.distill_top_k}"
        teacher, _ = load_for_inference(a.base)
        # the students' block_size (256) and precision (float32, see toml)
        wanted = teacher_cache.wanted_record(a.base, teacher, a.data, 256, a.distill_top_k,
                                             a.distill_temperature, "float16", torch.float32)
        start = time.perf_counter()
        teacher_cache.open_cache(cache, teacher, wanted, batch_size=16, quiet=True)
        record = json.loads((cache / teacher_cache.RECORD_FILE).read_text())
        return dict(dir=str(cache), seconds=round(time.perf_counter() - start, 1), built_in=record["seconds"],
                    rows=record["rows"], bytes=(cache / teacher_cache.CACHE_FILE).stat().st_size)

    def student_argv(self, kind: str, toml: Path, cache: str | None) -> list[str]:
        a = self.args
        if kind == "alone":
            return ["train", "--config", str(toml), "--quiet"]
        argv = ["distill", "--teacher", a.base, "--config", str(toml), "--quiet",
                "--set", f"alpha={a.distill_alpha}", "--set", f"temperature={a.distill_temperature}"]
        cached = ["--teacher-cache", cache, "--set", f"top_k={a.distill_top_k}"]
        return argv + (cached if kind == "cached" else [])

    def student_toml(self, out: Path, student: dict, seed: int, steps: int | None) -> Path:
        budget = dict(max_steps=steps) if steps else dict(max_steps=10**6, max_time=self.args.distill_seconds)
        return self.toml(out, student, seed=seed, lr=3e-3, min_lr=3e-4, warmup_steps=20, schedule="wsd",
                         **budget)

    def step_seconds(self, kinds: list[str], student: dict, cache: str | None) -> dict[str, float]:
        """Median seconds per optimizer step of each kind: 5 alternating rounds of 20 steps, each
        kind's trainer built as its run builds it (saved in --work; reused with --reuse)."""
        path = self.work / "step_seconds.json"
        saved = json.loads(path.read_text()) if self.args.reuse and path.is_file() else {}
        if all(k in saved for k in kinds):
            return saved
        a, trainers = self.args, {}
        for kind in kinds:
            cfg = load_train_config(self.student_toml(self.work / f"steptime-{kind}", student, 0, 10**6))
            dc = DistillConfig(teacher=a.base, alpha=a.distill_alpha, temperature=a.distill_temperature,
                               teacher_cache=cache if kind == "cached" else None, top_k=a.distill_top_k)
            trainers[kind] = (Trainer(cfg, quiet=True) if kind == "alone"
                              else DistillTrainer(cfg, dc, quiet=True))

        def timed(trainer, steps: int) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            return (time.perf_counter() - start) / steps

        rounds = alternate({k: (lambda n, t=t: timed(t, n)) for k, t in trainers.items()}, 5, 20, 5)
        result = {**saved, **{k: statistics.median(v) for k, v in rounds.items()}}
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(dict(step_seconds=result, rounds=rounds)), file=sys.stderr)
        return result

    def student_run(self, kind: str, seed: int, student: dict, cache: str | None, steps: int | None) -> dict:
        """Train one student (or read a finished one, --reuse): its final val loss, steps and tokens."""
        a = self.args
        name = kind if kind == "alone" else f"{kind}-a{a.distill_alpha}-T{a.distill_temperature}"
        out = self.work / f"student-{name}-{a.distill_seconds:g}s-{a.distill_budget}-{seed}"
        if not (a.reuse and final_row(out)):
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, not metrics appended to an old one
            argv = self.student_argv(kind, self.student_toml(out, student, seed, steps), cache)
            if cli(argv) != 0:
                raise SystemExit(f"failed: minillm {' '.join(argv)}")
        last = final_row(out)
        return dict(val_loss=last["val_loss"], steps=last["step"], tokens=last["tokens"])

    def distill(self) -> dict:
        a = self.args
        student = {**{k: v for k, v in self.config.to_dict().items() if k != "head_dim"},
                   **{k: int(v) for k, v in (kv.split("=") for kv in a.student.split(","))}}
        kinds = a.distill_kinds.split(",")
        cache = self.build_cache() if "cached" in kinds else None
        cache_dir = cache and cache["dir"]
        per_step = self.step_seconds(kinds, student, cache_dir) if a.distill_budget == "steps" else {}
        steps = {k: round(a.distill_seconds / per_step[k]) if per_step else None for k in kinds}
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for seed in [int(s) for s in a.seeds.split(",")]:
            for kind in kinds:  # one after the other per seed: the same machine state for every kind
                runs[kind].append(self.student_run(kind, seed, student, cache_dir, steps[kind]))
                print(json.dumps(dict(kind=kind, seed=seed, **runs[kind][-1])), file=sys.stderr)
        summary = {}
        for kind, rs in runs.items():
            v = [r["val_loss"] for r in rs]
            summary[kind] = dict(val_loss=v, mean=round(statistics.mean(v), 4),
                                 spread=round(max(v) - min(v), 4), steps=[r["steps"] for r in rs],
                                 tokens=[r["tokens"] for r in rs])
        for kind in kinds[1:]:
            gain = summary["alone"]["mean"] - summary[kind]["mean"]
            spread = max(summary["alone"]["spread"], summary[kind]["spread"])
            summary[kind].update(gain=round(gain, 4), goal_met=gain > spread)
        return dict(student=a.student, seconds=a.distill_seconds, budget=a.distill_budget,
                    step_seconds={k: round(v, 4) for k, v in per_step.items()}, alpha=a.distill_alpha,
                    temperature=a.distill_temperature, top_k=a.distill_top_k, cache=cache, **summary)


def final_row(run: Path) -> dict | None:
    """The last evaluation row (step, tokens, val_loss) of a finished student run; None if none."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return next((r for r in reversed(rows) if r.get("val_loss") is not None), None)


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    out_dir = bench.work if args.quick else Path(args.out_dir)  # a smoke run leaves the figures alone
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.distill_only:
        report = dict(machine=machine(), base=args.base, distill=bench.distill())
        (out_dir / "compress_prune_distill.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report))
        return
    rows = bench.sweep()
    bench.plot(rows, out_dir / "compress_prune.png")
    speed = {"base": bench.speed(), **{p: bench.speed(p) for p in args.speed_presets.split(",") if p}}
    report = dict(machine=machine(), base=args.base, sparsity=rows, speed=speed, distill=bench.distill())
    (out_dir / "compress_prune.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
