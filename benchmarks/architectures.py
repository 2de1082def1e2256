"""The architectures of issue 17 side by side on the built-in char corpus, for the same training time.

    python benchmarks/architectures.py [--seconds 60] [--out /tmp/arch-bench]
    python benchmarks/architectures.py --quick          # a smoke test (10 s per run)
    python benchmarks/architectures.py --extrapolation-only --threads 1   # part 3 alone (4 runs)

1. Decoder-only variants of one small LLaMA-style model (configs/shakespeare-char-cpu.toml with
   context --context, default 128: d_model 128, 4 layers, 4 heads, SwiGLU d_ff 344): the RoPE
   baseline, a sliding window of context/4, linear attention (elu + 1), ALiBi, and a mixture of 4
   experts with 1 active per token, each expert the baseline's MLP (d_ff 344), so the same ACTIVE
   parameters (4x the MLP parameters stored). Each trains `minillm train --set max_time=S` (the
   budget drives the lr schedule, so every run decays), one after another. Reported: val loss
   (`minillm eval --json` on --eval-tokens of the val split), training tokens/s (median of the
   logged rows), and greedy decoding at batch 1 of 4x the context: tokens/s and the bytes of the
   decoding state (summed from the cache objects). ALiBi, the window and linear attention decode
   past the context on their own caches (a KV cache of all 4x tokens, a ring of the window, a
   constant state; the window and linear attention keep RoPE, whose table is extended to 4x the
   context for decoding: within a window that is Mistral's case, for linear attention positions
   past the trained ones are extrapolation); RoPE can't go past max_seq_len, so the baseline and
   MoE decode with context_overflow="slide" (re-encoding the last context tokens each step, as
   --sliding-window).
2. The encoder-decoder (configs/shakespeare-reverse.toml) against a decoder-only model of about
   the same size (--decoder-layers LLaMA-style blocks) trained on the same task as prompt -> answer
   (`minillm finetune --method full` of a base run trained for 1 step, i.e. from scratch, on the task
   written as JSONL), the same max_time each; exact match of greedy answers on the test split's
   first --limit examples (`minillm eval --tasks --json`).
3. --extrapolation: length extrapolation (benchmarks/alibi_extrapolation.py): part 1's runs and one
   with sinusoidal positions, trained at --context T, evaluated at T, 2T and 4T on the val split.
   --extrapolation-only: that on the baseline, the window and ALiBi alone (no decoding, no part 2).
Plot: val loss against training time per variant (from metrics.jsonl), --figure (not in part 3 alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import alibi_extrapolation
import torch
from _common import ROOT, machine, run_measured
from safetensors import safe_open

from minillm.data import seq2seq_tasks, tasks
from minillm.torch.generate import generate
from minillm.torch.kv_cache import make_model_caches
from minillm.torch.layers import rope_tables
from minillm.torch.sft import load_for_inference

BASE_CONFIG = "configs/shakespeare-char-cpu.toml"
DATA = "data/shakespeare-char"


def variants(context: int) -> dict[str, list[str]]:
    """{name: --set overrides of the baseline}."""
    return {"baseline (RoPE)": [],
            f"sliding window {context // 4}": [f"model.attention_window={context // 4}"],
            "linear attention": ["model.attention=linear"],
            "ALiBi": ["model.positions=alibi"],
            "MoE 4x1 (same active)": ["model.n_experts=4", "model.experts_per_token=1"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="max_time of every training run")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--out", default="/tmp/arch-bench")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--limit", type=int, default=100, help="task examples scored")
    p.add_argument("--decoder-layers", type=int, default=7, help="decoder-only model of the task")
    p.add_argument("--figure", default=str(ROOT / "benchmarks/figures/architectures.png"))
    p.add_argument("--task-seconds", type=float, help="max_time of the two task runs (default --seconds)")
    p.add_argument("--tasks-only", action="store_true", help="only part 2 (the encoder-decoder's task)")
    p.add_argument("--extrapolation", action="store_true", help="part 3 too: val loss at 1, 2, 4x --context")
    p.add_argument("--extrapolation-only", action="store_true", help="part 3 alone (3 variants + sinusoidal)")
    p.add_argument("--threads", type=int, help="torch threads of every run and eval")
    p.add_argument("--quick", action="store_true", help="10 s runs, 20 examples, figure under --out")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.limit, args.eval_tokens = 10.0, 20, 16384
        args.figure = str(Path(args.out) / "architectures.png")
    args.task_seconds = args.task_seconds or args.seconds
    return args


def cli(argv: list[str], log: Path) -> str:
    """stdout of one `minillm` command in a child process (its log beside the runs)."""
    return run_measured([sys.executable, "-m", "minillm.cli", *argv], dict(os.environ), log)[2]


def sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def train_variant(args, name: str, overrides: list[str], run: Path) -> dict:
    """Train one variant for args.seconds; its val loss and training tokens/s."""
    eval_every = 25 if args.quick else 50
    cli(["train", "--config", BASE_CONFIG, "--quiet", *sets(
        [f"out_dir={run}", f"max_time={args.seconds}", "max_steps=1000000", f"block_size={args.context}",
         f"model.max_seq_len={args.context}", f"eval_interval={eval_every}", "eval_batches=8",
         *([f"threads={args.threads}"] if args.threads else []), *overrides])],
        run.with_suffix(".train.log"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first includes start-up
    threads = ["--threads", str(args.threads)] if args.threads else []
    out = cli(["eval", "--run", str(run), "--data", DATA, "--json", "--max-tokens", str(args.eval_tokens),
               *threads], run.with_suffix(".eval.log"))
    trained = max(r.get("tokens", 0) for r in rows)
    total = count_params(run)
    return {"name": name, "val_loss": json.loads(out.splitlines()[-1])["loss"], "tokens": trained,
            "train_tok_s": statistics.median(speeds), "params": total, "active": active_params(run, total),
            "rows": rows, "run": run}


def part1_variants(args) -> dict[str, list[str]]:
    """Part 1's variants; with --extrapolation-only the baseline, the window and ALiBi alone."""
    every = {} if args.tasks_only else variants(args.context)
    if not args.extrapolation_only:
        return every
    return {name: every[name] for name in ("baseline (RoPE)", f"sliding window {args.context // 4}", "ALiBi")}


def count_params(run: Path) -> int:
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def state_bytes(caches: list) -> int:
    """Bytes of the tensors a decoding state holds (KV caches, rings, linear-attention states)."""
    return sum(v.nbytes for c in caches for v in vars(c).values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def decode(run: Path, n: int) -> tuple[float, int, str]:
    """(tokens/s, state bytes, how) of greedy decoding of n tokens at batch 1 after one token."""
    model, tok = load_for_inference(run)
    model.eval()
    cfg = model.config
    return decode_model(model, tok, cfg, n)


def active_params(run: Path, total: int) -> int:
    """Parameters one token uses: all but the experts the router leaves out (SwiGLU: 3 d_model x d_ff)."""
    m = json.loads((run / "config.json").read_text()).get("model", {})
    idle = m.get("n_experts", 1) - m.get("experts_per_token", 1) if m.get("n_experts") else 0
    return total - idle * 3 * m.get("d_model", 0) * m.get("d_ff", 0) * m.get("n_layers", 0)


def decode_model(model, tok, cfg, n: int) -> tuple[float, int, str]:
    prompt = tok.encode("\n")[:1] or [0]
    bounded = cfg.positions in ("rope", "learned") and cfg.attention != "linear" and not cfg.attention_window
    if bounded:  # can't pass max_seq_len: re-encode the last max_seq_len tokens (--sliding-window)
        start = time.perf_counter()
        out = generate(model, prompt, n, temperature=0.0, context_overflow="slide")
        speed = len(out) / (time.perf_counter() - start)
        return speed, state_bytes(make_model_caches(cfg, 1, cfg.max_seq_len)), "slide (re-encode)"
    if cfg.positions == "rope":  # the window / linear attention on RoPE: the same formula, a longer table
        model.rope_cos, model.rope_sin = rope_tables(len(prompt) + n, cfg.head_dim, cfg.rope_theta)
    caches = make_model_caches(cfg, 1, len(prompt) + n)
    start = time.perf_counter()
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)), kv_caches=caches)[:, -1]
    for pos in range(len(prompt), len(prompt) + n - 1):
        token = logits.argmax(-1, keepdim=True)  # (1, 1)
        logits = model(token, torch.tensor([pos]), kv_caches=caches)[:, -1]
    speed = n / (time.perf_counter() - start)
    return speed, state_bytes(caches), type(caches[0]).__name__


def write_task_jsonl(root: Path) -> Path:
    """The seq2seq task's splits as JSONL of its SFT-shaped examples (what finetune and eval read)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        tasks.write_jsonl(seq2seq_tasks.load(seq2seq_tasks.BUILTIN, split), root / f"{split}.jsonl")
    return root


def exact_match(run: Path, task_set: str, limit: int) -> float:
    out = cli(["eval", "--run", str(run), "--tasks", task_set, "--limit", str(limit), "--json"],
              run.with_suffix(".eval.log"))
    return json.loads(out.splitlines()[-1])["exact_match"]


def seq2seq(args, out: Path) -> list[dict]:
    """Encoder-decoder vs decoder-only on builtin:shakespeare-reverse, the same training time."""
    encdec = out / "encdec"
    cli(["train", "--config", "configs/shakespeare-reverse.toml", "--quiet",
         *sets([f"out_dir={encdec}", f"max_time={args.task_seconds}", "max_steps=1000000"])],
        encdec.with_suffix(".train.log"))
    task_dir = write_task_jsonl(out / "reverse-tasks")
    base, dec = out / "dec-base", out / "dec-only"
    cli(["train", "--config", BASE_CONFIG, "--quiet", *sets(
        [f"out_dir={base}", "max_steps=1", "block_size=128", "model.max_seq_len=128",
         f"model.n_layers={args.decoder_layers}"])], base.with_suffix(".train.log"))
    cli(["finetune", "--run", str(base), "--data", str(task_dir / "train.jsonl"), "--method", "full",
         "--out", str(dec), "--quiet", *sets([f"max_time={args.task_seconds}", "max_steps=1000000",
                                              "batch_size=32", "block_size=128", "lr=2e-3", "min_lr=2e-4",
                                              "warmup_steps=50"])], dec.with_suffix(".train.log"))
    return [{"name": "encoder-decoder (3+3)", "params": count_params(encdec),
             "exact": exact_match(encdec, seq2seq_tasks.BUILTIN, args.limit)},
            {"name": f"decoder-only ({args.decoder_layers} layers, prompt -> answer)",
             "params": count_params(dec), "exact": exact_match(dec, str(task_dir), args.limit)}]


def plot(results: list[dict], path: str, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        val = [row for row in r["rows"] if row.get("val_loss") is not None]
        ax.plot([row["tokens"] / 1e3 for row in val], [row["val_loss"] for row in val], marker=".",
                label=f"{r['name']} ({r['val_loss']:.3f})")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"Architectures on shakespeare-char, {seconds:g} s of training each (2 CPU cores)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(args, results: list[dict], tasks_rows: list[dict]) -> str:
    n = 4 * args.context
    head = [f"| variant | params (active) | val loss | train tok/s | tokens trained | decode tok/s "
            f"({n} tokens, batch 1) | decode state | decoding past the context |",
            "|---|---|---|---|---|---|---|---|"]
    lines = head if results else []
    for r in results:
        lines.append(f"| {r['name']} | {r['params']:,} ({r['active']:,}) | {r['val_loss']:.3f} | "
                     f"{r['train_tok_s']:,.0f} | {r['tokens']:,} | {r['decode_tok_s']:,.0f} | "
                     f"{r['state_bytes'] / 1024:,.0f} KiB | {r['how']} |")
    lines += ["", f"| builtin:shakespeare-reverse ({args.task_seconds:g} s each) | params | exact match "
              f"(test, first {args.limit}) |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['params']:,} | {r['exact']:.3f} |" for r in tasks_rows]
    return "\n".join(lines)


def extrapolation(args, out: Path, results: list[dict]) -> str:
    """Part 3: the table of alibi_extrapolation.measure on part 1's runs (+ a sinusoidal one)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = alibi_extrapolation.measure([(r["name"], r["run"]) for r in results],
                                       lambda name, overrides, run: train_variant(args, name, overrides, run),
                                       out, ROOT / DATA, args.context, args.eval_tokens)
    return alibi_extrapolation.table(rows, args.context, args.eval_tokens)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = [f"v{i}" for i in range(len(variants(args.context)))] + ["v-sinusoidal", "encdec", "dec-base"]
    for name in old + ["dec-only"]:
        shutil.rmtree(out / name, ignore_errors=True)  # a run directory left there would be appended to
    start_machine, results, report = machine(), [], ""
    for i, (name, overrides) in enumerate(part1_variants(args).items()):
        run = out / f"v{i}"
        print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)
        r = train_variant(args, name, overrides, run)
        if not args.extrapolation_only:
            r["decode_tok_s"], r["state_bytes"], r["how"] = decode(run, 4 * args.context)
        results.append(r)
    if not args.extrapolation_only:
        if results:
            plot(results, args.figure, args.seconds)
        print(f"{time.strftime('%H:%M:%S')} seq2seq", flush=True)
        report = table(args, results, seq2seq(args, out)) + "\n\n"
    if args.extrapolation or args.extrapolation_only:
        report += extrapolation(args, out, results) + "\n\n"
    report += (f"start: {start_machine}\nend: {machine()}\n"
               f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}\n")
    (out / "architectures.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
