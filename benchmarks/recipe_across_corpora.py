"""Does our CPU recipe hold on text it was not tuned on? Time to nanoGPT's loss on three corpora.

    python benchmarks/recipe_across_corpora.py --nanogpt /path/to/nanoGPT [--rounds 1]
        [--corpora shakespeare django-docs django-code] [--fractions 0.25 0.35 0.5]
        [--variant '' --variant 'optimizer="muon"'] [--set KEY=VALUE ...] [--nanogpt-cache FILE.json]

For each corpus (minillm.data.corpora: dialogue, technical prose, code), prepared at character
level into data/<corpus>-char if missing: nanoGPT's README CPU recipe (2,000 iterations) gives a
final val loss L and a training time T (evaluation excluded). Then our recipe,
configs/shakespeare-char-cpu.toml, runs with `--set max_time=f*T` as its only change (the budget
drives the warmup-stable-decay schedule) for each fraction f, and we report the smallest f whose
final val loss reaches L. Runs alternate nanoGPT, ours ... in one process; with --rounds > 1 the
times are medians over rounds. `--set` changes our recipe (a variant to try); `--nanogpt-cache`
keeps nanoGPT's results in a JSON file and reuses them (for trying variants quickly: the
figures BENCHMARKS.md reports come from runs without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT
from train_vs_nanogpt import run_nanogpt, run_ours

RECIPE = "configs/shakespeare-char-cpu.toml"


def prepared(corpus: str) -> Path:
    data = ROOT / "data" / f"{corpus}-char"
    if not (data / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "minillm.cli", "prepare", "--source", corpus,
                        "--tokenizer", "char", "--out", str(data)], cwd=ROOT, check=True)
    return data


def one_corpus(args, corpus: str, tmp: Path) -> dict:
    """nanoGPT once per round, then ours at each fraction of nanoGPT's time."""
    data = prepared(corpus)
    rows = []
    cached = args.nanogpt_cache and args.nanogpt_cache.is_file()
    cache = json.loads(args.nanogpt_cache.read_text()) if cached else {}
    for r in range(args.rounds):
        key = f"{corpus}/{r}"
        ng = cache.get(key) or run_nanogpt(args.nanogpt.resolve(), data, tmp / f"{corpus}-ng{r}")
        if args.nanogpt_cache:
            cache[key] = ng
            args.nanogpt_cache.write_text(json.dumps(cache))
        ours = {}
        for f in args.fractions:
            for v, variant in enumerate(args.variant or [""]):
                sets = [x for x in variant.split(";") if x] + args.set
                run = run_ours(RECIPE, tmp / f"{corpus}-ours{r}-{f}-{v}", f'data_dir="{data}"',
                               "max_steps=1000000", f"max_time={f * ng['train_s']:.1f}",
                               "eval_interval=1000000", "eval_batches=50", *sets)
                ours[(variant, f)] = run["final_val"]
                print(f"{corpus} round {r}: nanoGPT val {ng['final_val']:.4f} in {ng['train_s']:.1f} s "
                      f"({ng['tokens_per_s']:,.0f} tok/s); ours{' ' + variant if variant else ''} at "
                      f"{f:.2f}x ({f * ng['train_s']:.1f} s): val {run['final_val']:.4f} "
                      f"({run['tokens_per_s']:,.0f} tok/s)", flush=True)
        rows.append(dict(target=ng["final_val"], nanogpt_s=ng["train_s"], ours=ours))
    return dict(corpus=corpus, rows=rows)


def report(result: dict, fractions: list[float], variant: str) -> str:
    rows = result["rows"]
    target = statistics.median(r["target"] for r in rows)
    ng_s = statistics.median(r["nanogpt_s"] for r in rows)
    finals = {f: statistics.median(r["ours"][(variant, f)] for r in rows) for f in fractions}
    reached = [f for f in fractions if finals[f] <= target]
    cells = " | ".join(f"{finals[f]:.4f}" for f in fractions)
    best = f"**{min(reached):.2f}x**" if reached else f"not within {max(fractions):.2f}x"
    ours = variant or "the recipe"
    return f"| {result['corpus']} | {ours} | {target:.4f} | {ng_s:.1f} s | {cells} | {best} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, type=Path, help="path to a local nanoGPT clone")
    ap.add_argument("--corpora", nargs="+", default=["shakespeare", "django-docs", "django-code"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.35, 0.5])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a change to our recipe")
    ap.add_argument("--variant", action="append", metavar="K=V;K=V",
                    help="also run the recipe with these changes ('' = as is; repeatable), e.g. "
                         "--variant '' --variant 'optimizer=\"muon\"'")
    ap.add_argument("--nanogpt-cache", type=Path, help="reuse nanoGPT's results from this JSON file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpora-"))
    results = [one_corpus(args, corpus, tmp) for corpus in args.corpora]
    head = " | ".join(f"ours val at {f:.2f}x" for f in args.fractions)
    print(f"\n| corpus | ours | nanoGPT final val | nanoGPT train time | {head} | time to nanoGPT's loss |")
    print("|---|---|---:|---:|" + "---:|" * len(args.fractions) + "---|")
    for result in results:
        for variant in args.variant or [""]:
            print(report(result, args.fractions, variant))


if __name__ == "__main__":
    main()
